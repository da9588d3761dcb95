from django.apps import AppConfig
from django.core import checks


class AgreementsConfig(AppConfig):
    name = "agreements"

    def ready(self):
        from agreements import invocations, monitoring, services, webhooks
        from catalog import services as catalog_services

        services.handlers_register()  # carries out approval decisions (policies)
        # A revoked credential's webhook subscriptions stop with it (catalog's credential_revoke).
        catalog_services.credential_revocation_handler_register(webhooks.subscriptions_of_revoked_credentials_pause)
        monitoring.panels_register()
        # What escrow registers for agreements (its ready() runs after this one): checked once all apps are ready.
        checks.register(services.hooks_check)
        checks.register(invocations.settlement_handler_check)
        checks.register(monitoring.receipt_signers_check, checks.Tags.database)
        checks.register(services.fee_schedule_check, checks.Tags.database)
