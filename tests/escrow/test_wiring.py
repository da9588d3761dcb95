"""Handlers are registered in each AppConfig.ready(); one missing fails at start-up (Django's system checks, run by
`manage.py check`, `migrate` and `runserver`) and, should it get that far, loudly at run time (issue 15)."""

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from agreements import invocations, x402_protocol
from agreements import services as agreement_services
from escrow import relayer
from escrow.models import ChainTransaction, TxPurpose, TxStatus
from tests.conftest import error_code
from tests.escrow.flow import mined_what_was_sent


def test_every_handler_is_registered_at_start_up():
    call_command("check")  # raises SystemCheckError on any missing handler


@pytest.mark.parametrize("purpose", TxPurpose.values)
def test_start_up_check_fails_for_a_transaction_kind_without_outcome_handler(monkeypatch, purpose):
    monkeypatch.delitem(relayer._outcome_handlers, purpose)
    with pytest.raises(SystemCheckError, match=rf"escrow\.E001.*No outcome handler for {purpose} chain"):
        call_command("check")


@pytest.mark.parametrize(("registry", "message"), [
    (agreement_services._direct_payment_executor, r"agreements\.E001.*No direct payment executor"),
    (agreement_services._permit_nonce_reader, r"agreements\.E001.*No permit nonce reader"),
    (agreement_services._authorization_spent_reader, r"agreements\.E001.*No authorization state reader"),
    (x402_protocol._token_domain_reader, r"agreements\.E001.*No token domain reader"),
    (invocations._settlement_handler, r"agreements\.E002.*No invocation settlement handler"),
])
def test_start_up_check_fails_for_a_missing_agreements_hook(registry, message):
    saved = list(registry)
    registry.clear()
    try:
        with pytest.raises(SystemCheckError, match=message):
            call_command("check")
    finally:
        registry[:] = saved


@pytest.mark.chain
@pytest.mark.django_db
def test_the_relayer_refuses_to_conclude_a_transaction_nobody_handles(escrow_chain, monkeypatch):
    """Before: the outcome was skipped and the transaction marked confirmed and applied; now the conclusion is
    rolled back with a clear error, so it is applied once the handler is back."""
    tx = ChainTransaction.objects.create(purpose=TxPurpose.NONCE_FILL, to_address=escrow_chain.accounts.buyer.address,
                                         data="0x", chain_id=escrow_chain.chain_id, confirmations_required=1)
    relayer.transaction_submit(transaction_id=tx.pk)
    mined_what_was_sent()  # else the check may find no receipt yet, and conclude nothing
    monkeypatch.delitem(relayer._outcome_handlers, TxPurpose.NONCE_FILL, raising=False)
    with pytest.raises(ImproperlyConfigured, match="No outcome handler for nonce_fill chain transactions"):
        relayer.transaction_check(transaction_id=tx.pk)
    tx.refresh_from_db()
    assert (tx.status, tx.outcome_applied) == (TxStatus.SUBMITTED, False)

    monkeypatch.undo()
    relayer.transaction_check(transaction_id=tx.pk)
    tx.refresh_from_db()
    assert (tx.status, tx.outcome_applied) == (TxStatus.CONFIRMED, True)


def test_network_config_on_a_marketplace_with_no_chain_configured_is_503_chain_not_configured(anon, settings):
    """As every other chain route answers then (`make run` with no chain): it was a 500, to anyone, unauthenticated."""
    settings.USDC_ADDRESS = settings.USAGE_ESCROW_ADDRESS = ""

    response = anon.get("/network-config")

    assert response.status_code == 503, response.content
    assert error_code(response) == "chain_not_configured"
