from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace platform"

    def ready(self):
        # Connects the Celery task-failure counter, the dead-letter count and the readiness checks of the platform's
        # own dependencies.
        from django.contrib import admin

        from marketplace import dead_letters, health, metrics  # noqa: F401

        admin.site.index_template = "admin/marketplace_index.html"  # links the operators' dashboard
