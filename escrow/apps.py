from django.apps import AppConfig


class EscrowConfig(AppConfig):
    name = "escrow"

    def ready(self):
        # Registers the relayer outcome handlers of escrow transactions.
        from escrow import payments, services, settlement  # noqa: F401
