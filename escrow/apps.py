from django.apps import AppConfig


class EscrowConfig(AppConfig):
    name = "escrow"

    def ready(self):
        # Registers the relayer outcome handlers, the chain readiness check, the metrics and dashboard panels.
        from escrow import monitoring, services, settlement, x402_onchain  # noqa: F401
