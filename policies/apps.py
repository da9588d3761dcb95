from django.apps import AppConfig


class PoliciesConfig(AppConfig):
    name = "policies"

    def ready(self):
        # Registers the approval counts shown in /metrics and on the admin dashboard.
        from policies import monitoring  # noqa: F401
