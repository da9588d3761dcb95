"""Disputes time out on-chain (UsageEscrow.DISPUTE_TIMEOUT, 30 days after the challenge): then the buyer gets the
whole deposit back and the arbiter may no longer resolve. The operators who arbitrate see each dispute's timeout
in the admin's Disputes list (soonest first, a filter for those timing out soon), on the dashboard and in /metrics
once it is within DISPUTE_TIMEOUT_WARNING_SECONDS, and a dispute that timed out is shown as such."""

from datetime import timedelta

import pytest
from django.utils import timezone

from django.contrib.auth import get_user_model

from agreements.models import AgreementEvent, AgreementStatus, UsageAgreement
from escrow import selectors
from escrow.models import ChainTransaction, TxPurpose
from tests.agreements.helpers import propose
from tests.catalog.factories import issue_owner_token, register_service
from tests.conftest import Api, error_code
from tests.marketplace.conftest import scrape

pytestmark = pytest.mark.django_db

S = AgreementStatus


def _event(agreement_id, *, from_status, to_status, reason, at, data=None):
    event = AgreementEvent.objects.create(agreement_id=agreement_id, actor_kind=AgreementEvent.ActorKind.SYSTEM,
                                          actor_label="system", from_status=from_status, to_status=to_status,
                                          reason=reason, data=data or {})
    AgreementEvent.objects.filter(pk=event.pk).update(created_at=at)


def disputed(buyer_api, service, *, days_ago: float, reason="wrong answers") -> str:
    """An agreement the buyer challenged `days_ago` days ago (by the books), still disputed."""
    agreement = propose(buyer_api, service, quantity=1)
    challenged_at = timezone.now() - timedelta(days=days_ago)
    UsageAgreement.objects.filter(pk=agreement["id"]).update(
        status=S.DISPUTED, status_reason=reason, challenge_deadline=challenged_at + timedelta(hours=1))
    _event(agreement["id"], from_status=S.IN_CHALLENGE, to_status=S.DISPUTED, reason=reason, at=challenged_at)
    return agreement["id"]


def closed_dispute(buyer_api, service, *, timed_out: bool) -> str:
    agreement_id = disputed(buyer_api, service, days_ago=31 if timed_out else 3)
    if timed_out:
        _event(agreement_id, from_status=S.DISPUTED, to_status=S.SETTLING, at=timezone.now(),
               reason="dispute not resolved by its timeout: the whole deposit goes back to the buyer",
               data={"dispute_timed_out_at": int((timezone.now() - timedelta(hours=2)).timestamp())})
    else:
        _event(agreement_id, from_status=S.DISPUTED, to_status=S.SETTLING, at=timezone.now(),
               reason="arbiter resolved: 10000 to the seller", data={"tx_hash": "0x" + "ab" * 32})
    _event(agreement_id, from_status=S.SETTLING, to_status=S.SETTLED, at=timezone.now(),
           reason="escrow paid out on-chain")
    UsageAgreement.objects.filter(pk=agreement_id).update(status=S.SETTLED)
    return agreement_id


def test_the_disputes_list_shows_each_timeout_soonest_first(operator, buyer_api, seller):
    service = register_service(seller)
    recent = disputed(buyer_api, service, days_ago=1)
    urgent = disputed(buyer_api, service, days_ago=28)
    page = operator.get("/admin/escrow/dispute/")
    assert page.status_code == 200
    listed = [str(row.pk) for row in page.context["cl"].result_list]
    assert listed == [urgent, recent]
    html = page.content.decode()
    expected = (timezone.now() - timedelta(days=28) + selectors.DISPUTE_TIMEOUT).strftime("%Y-%m-%d %H:%M")
    assert expected in html
    assert "1\xa0day, 23\xa0hours left" in html  # timeuntil keeps each number with its unit
    agreement_page = operator.get(f"/admin/agreements/usageagreement/{urgent}/change/").content.decode()
    assert f"Times out about {expected}" in agreement_page and "1\xa0day, 23\xa0hours left" in agreement_page


def test_the_disputes_list_filters_those_timing_out_within_the_warning(operator, buyer_api, seller, settings):
    settings.DISPUTE_TIMEOUT_WARNING = timedelta(days=7)
    service = register_service(seller)
    disputed(buyer_api, service, days_ago=1)
    urgent = disputed(buyer_api, service, days_ago=24)
    page = operator.get("/admin/escrow/dispute/?dispute=timing_out")
    assert page.status_code == 200
    assert [str(row.pk) for row in page.context["cl"].result_list] == [urgent]
    assert "times out within 7 days" in page.content.decode()


def test_a_dispute_that_timed_out_shows_it_was_settled_for_the_buyer(operator, buyer_api, seller):
    service = register_service(seller)
    timed_out = closed_dispute(buyer_api, service, timed_out=True)
    resolved = closed_dispute(buyer_api, service, timed_out=False)
    page = operator.get("/admin/escrow/dispute/?dispute=timed_out")
    assert page.status_code == 200
    assert [str(row.pk) for row in page.context["cl"].result_list] == [timed_out]
    assert "timed out: the whole deposit to the buyer" in page.content.decode()
    everything = operator.get("/admin/escrow/dispute/?dispute=all")
    assert {str(row.pk) for row in everything.context["cl"].result_list} == {timed_out, resolved}
    assert "arbiter resolved: 10000 to the seller" in everything.content.decode()
    assert [row.pk for row in operator.get("/admin/escrow/dispute/").context["cl"].result_list] == []  # open only


def test_the_dashboard_lists_disputes_timing_out_within_the_warning(operator, buyer_api, seller, settings):
    settings.DISPUTE_TIMEOUT_WARNING = timedelta(days=7)
    service = register_service(seller)
    disputed(buyer_api, service, days_ago=1)
    urgent = disputed(buyer_api, service, days_ago=25)
    page = operator.get("/admin/dashboard/")
    items = [item for item in page.context["overdue"] if item.kind.startswith("dispute times out")]
    assert [item.subject for item in items] == [urgent]
    assert f"/admin/escrow/dispute/{urgent}/resolve/" in page.content.decode()


def test_metrics_count_disputes_open_and_timing_out(operator, buyer_api, seller, settings):
    settings.DISPUTE_TIMEOUT_WARNING = timedelta(days=7)
    service = register_service(seller)
    disputed(buyer_api, service, days_ago=1)
    disputed(buyer_api, service, days_ago=25)
    disputed(buyer_api, service, days_ago=31)  # past its timeout, the settlement tick's finalize not mined yet
    closed_dispute(buyer_api, service, timed_out=True)
    metrics = scrape(operator)
    assert metrics[("marketplace_disputes_open", ())] == 3
    assert metrics[("marketplace_disputes_timing_out", ())] == 2


def test_a_resolution_asked_for_while_the_node_is_down_is_refused_as_unavailable_not_a_500(operator, buyer, buyer_api,
                                                                                           seller, settings):
    """The escrow's terms are read from the chain when its Activated event is not indexed (the indexer behind): that
    read was made outside the mapping of node errors to 503, so with the node down the admin's Resolve form and
    `POST /usage-agreements/{id}/resolve` were a 500. Now the operator is told the chain is unavailable, nothing
    queued."""
    agreement_id = disputed(buyer_api, register_service(seller), days_ago=3)
    UsageAgreement.objects.filter(pk=agreement_id).update(buyer_wallet_address=buyer.wallet_address)
    settings.USAGE_ESCROW_ADDRESS = "0x" + "12" * 20
    settings.CHAIN_RPC_URL = "http://127.0.0.1:9"  # nothing listens there

    page = operator.post(f"/admin/escrow/dispute/{agreement_id}/resolve/", {"seller_amount_atomic": 0})
    assert page.status_code == 200 and "(chain_unavailable)" in page.content.decode()
    api = Api(issue_owner_token(get_user_model().objects.get(username="operator")))
    response = api.post(f"/usage-agreements/{agreement_id}/resolve", {"seller_amount_atomic": 0})
    assert response.status_code == 503 and error_code(response) == "chain_unavailable"
    assert not ChainTransaction.objects.filter(purpose=TxPurpose.RESOLVE).exists()
    assert UsageAgreement.objects.get(pk=agreement_id).status == S.DISPUTED


def test_the_resolve_form_names_the_disputed_proposal_as_the_most_the_seller_may_be_awarded(operator, buyer_api,
                                                                                            seller):
    """The form's hint (its bound and its help) named the deposit, while the resolution refuses more than the
    settlement the seller proposed and the buyer disputed (400 `amount_exceeds_proposal`): an operator following it
    typed an award the chain would never take."""
    agreement_id = disputed(buyer_api, register_service(seller), days_ago=2)
    # The 2nd of 3 receipts proposed (the 3rd charged after the proposal).
    UsageAgreement.objects.filter(pk=agreement_id).update(deposit_amount=2_000_000, proposed_seq=2,
                                                          proposed_amount=200_000, usage_seq=3, used=300_000)

    page = operator.get(f"/admin/escrow/dispute/{agreement_id}/resolve/")

    assert page.status_code == 200
    field = page.context["form"]["seller_amount_atomic"]
    assert field.field.widget.attrs["max"] == 200_000
    assert "0.20 USDC" in str(field.help_text) and "proposed" in str(field.help_text)
