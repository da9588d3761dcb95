from django.apps import AppConfig


class AgreementsConfig(AppConfig):
    name = "agreements"

    def ready(self):
        # Registers the approval-decision handler with the policies app, and the metrics and dashboard panels.
        from agreements import monitoring, services  # noqa: F401
