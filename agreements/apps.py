from django.apps import AppConfig
from django.core import checks


class AgreementsConfig(AppConfig):
    name = "agreements"

    def ready(self):
        from agreements import invocations, monitoring, services

        services.handlers_register()  # carries out approval decisions (policies)
        monitoring.panels_register()
        # What escrow registers for agreements (its ready() runs after this one): checked once all apps are ready.
        checks.register(services.hooks_check)
        checks.register(invocations.settlement_handler_check)
        checks.register(monitoring.receipt_signers_check, checks.Tags.database)
        checks.register(services.fee_schedule_check, checks.Tags.database)
