from django.apps import AppConfig
from django.conf import settings
from django.db.models.signals import post_save


def _owner_saved(sender, instance, raw: bool = False, update_fields=None, **kwargs) -> None:
    if raw or (update_fields is not None and "is_active" not in update_fields):
        return  # a fixture load, or a save of other fields (a login's last_login)
    from catalog import services

    services.agents_owner_activity_sync(owner=instance)


class CatalogConfig(AppConfig):
    name = "catalog"
    verbose_name = "Catalog: agents, keys and services"

    def ready(self) -> None:
        # Whatever saves a user (the admin, User.save): its agents sell only while it is active.
        post_save.connect(_owner_saved, sender=settings.AUTH_USER_MODEL, dispatch_uid="catalog.owner_saved")
