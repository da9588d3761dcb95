from django.apps import AppConfig


class AgreementsConfig(AppConfig):
    name = "agreements"

    def ready(self):
        # Registers the approval-decision handler for usage agreements with the policies app.
        from agreements import monitoring, services  # noqa: F401
