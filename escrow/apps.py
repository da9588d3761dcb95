from django.apps import AppConfig
from django.core import checks


class EscrowConfig(AppConfig):
    name = "escrow"

    def ready(self):
        from escrow import fees, monitoring, relayer, services, settlement, x402_onchain
        from escrow.models import TxPurpose

        services.handlers_register()  # activation
        settlement.handlers_register()  # propose, challenge, resolve, finalize, reclaim
        x402_onchain.handlers_register()  # skill invocations and direct payments
        fees.handlers_register()  # payFees
        relayer.outcome_handler_register(purpose=TxPurpose.NONCE_FILL, on_outcome=relayer.nonce_fill_outcome,
                                         on_reopened=relayer.nonce_fill_reopened)
        monitoring.panels_register()
        checks.register(relayer.outcome_handlers_check)
