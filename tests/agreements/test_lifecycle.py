from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agreements import services as agreement_services
from agreements.models import AgreementEvent, UsageAgreement
from agreements.tasks import expire_proposals, expire_unfunded_past_term
from catalog.models import Agent, ServiceState
from marketplace.sweeps import RowsFailed
from tests.agreements.helpers import propose, proposal
from tests.catalog.factories import AgentFactory, UserFactory, issue_key, register_service
from tests.conftest import Api, codes_at, error_code
from tests.support.poison_rows import first_row_always_fails, sweep_runs

pytestmark = pytest.mark.django_db


def statuses(agreement_id) -> list[tuple[str, str]]:
    return list(AgreementEvent.objects.filter(agreement_id=agreement_id).values_list("from_status", "to_status"))


def test_propose_freezes_terms(buyer, buyer_api, service):
    agreement = propose(buyer_api, service, quantity=50)
    assert agreement["status"] == "proposed"
    assert agreement["deposit_amount_atomic"] == 50 * 20_000
    assert agreement["infra_fee_atomic"] == 100_000  # the minimum fee applies to 1 USDC
    assert agreement["price_per_unit_atomic"] == 20_000
    assert agreement["buyer_wallet_address"] == buyer.wallet_address
    assert agreement["seller_wallet_address"] == service.seller.wallet_address
    assert agreement["terms_hash"].startswith("0x") and len(agreement["terms_hash"]) == 66
    assert agreement["onchain_id"] == "0x" + agreement["id"].replace("-", "").rjust(64, "0")
    assert agreement["used_atomic"] == 0 and agreement["remaining_atomic"] == 1_000_000
    assert agreement["approval"] is None

    # A later price change does not touch the agreement.
    Api(issue_key(service.seller)).patch(f"/agents/services/{service.pk}",
                                         {"pricing": {"type": "per_call", "unit_price_atomic": 99}})
    assert buyer_api.get(f"/usage-agreements/{agreement['id']}").json()["price_per_unit_atomic"] == 20_000


@pytest.mark.parametrize("held", [False, True], ids=["proposed", "pending_approval"])
def test_a_proposals_answer_is_the_agreement_as_read_back(buyer, buyer_api, owner_api, service, held):
    if held:
        owner_api.put(f"/agents/{buyer.pk}/policies", {"approval_threshold_atomic": 1})
    # An expiry given with an offset, and a seller's display name set: what the answer shows comes from the agreement
    # as written, not read back, and must be the same.
    service.seller.display_name = "Seller One"
    service.seller.save(update_fields=["display_name"])
    expires_at = (timezone.now() + timedelta(days=2)).astimezone(timezone.get_fixed_timezone(120)).isoformat()
    answered = propose(buyer_api, service, expires_at=expires_at)
    assert answered["status"] == ("pending_approval" if held else "proposed")
    assert (answered["approval"] is not None) == held
    assert answered == buyer_api.get(f"/usage-agreements/{answered['id']}").json()


def test_a_proposal_reads_each_thing_once(buyer_api, service):
    """A proposal was the API's dearest call (bench/load.py: ~14 ms of CPU, 21 statements): it read the agreement
    back after writing it, the service's skills it never shows, the buyer's spend once per cap window, and the
    service's tags again after reading them with the service."""
    propose(buyer_api, service)  # the fee schedule's row, made on first use
    with CaptureQueriesContext(connection) as captured:
        propose(buyer_api, service)
    statements = [query["sql"] for query in captured.captured_queries]
    agreements = connection.ops.quote_name(UsageAgreement._meta.db_table)
    reads_of_agreements = [sql for sql in statements if sql.startswith("SELECT") and f"FROM {agreements}" in sql]
    assert len(reads_of_agreements) == 1 and "SUM(" in reads_of_agreements[0]  # the spend in both windows, alone
    assert not [sql for sql in statements if "catalog_skill" in sql]
    assert len([sql for sql in statements if "catalog_tag" in sql]) == 1
    assert len(statements) <= 17


def test_accept_is_idempotent_and_audited(buyer_api, seller_api, service):
    agreement = propose(buyer_api, service)
    url = f"/usage-agreements/{agreement['id']}/accept"
    first = seller_api.put(url)
    assert first.status_code == 200 and first.json()["status"] == "accepted"
    assert first.json()["accepted_at"]
    again = seller_api.put(url)
    assert again.status_code == 200 and again.json()["accepted_at"] == first.json()["accepted_at"]
    assert statuses(agreement["id"]) == [("", "proposed"), ("proposed", "accepted")]

    events = seller_api.get(f"/usage-agreements/{agreement['id']}/events").json()["results"]
    assert [(e["from_status"], e["to_status"], e["actor_kind"]) for e in events] == [
        ("", "proposed", "buyer"), ("proposed", "accepted", "seller")]


def test_an_escrow_above_a_since_lowered_platform_limit_is_refused_at_the_sellers_accept_with_nothing_written(
        buyer_api, seller_api, service, settings):
    """Proposed under a higher AGREEMENT_MAX_AMOUNT, an escrow was still accepted once the operator lowered it, and
    refused only at activation: the parties went one step further for nothing. The ceiling in force binds at the
    accept, as at a direct purchase's: 400 `amount_too_large`, the agreement stays proposed, no event written; at the
    limit it is accepted."""
    agreement = propose(buyer_api, service)
    deposit = int(agreement["deposit_amount_atomic"])
    settings.AGREEMENT_MAX_AMOUNT = deposit - 1

    refused = seller_api.put(f"/usage-agreements/{agreement['id']}/accept")

    assert refused.status_code == 400 and error_code(refused) == "amount_too_large", refused.content
    assert refused.json()["error"]["details"] == {"max_amount_atomic": deposit - 1}
    assert statuses(agreement["id"]) == [("", "proposed")]
    settings.AGREEMENT_MAX_AMOUNT = deposit
    accepted = seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
    assert accepted.status_code == 200 and accepted.json()["status"] == "accepted", accepted.content


def test_reject_with_reason(buyer_api, seller_api, service):
    agreement = propose(buyer_api, service)
    response = seller_api.put(f"/usage-agreements/{agreement['id']}/reject", {"reason": "fully booked"})
    assert response.json()["status"] == "rejected"
    assert response.json()["status_reason"] == "fully booked"
    accept = seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
    assert accept.status_code == 409
    assert error_code(accept) == "invalid_transition"
    assert accept.json()["error"]["details"]["status"] == "rejected"
    assert len(statuses(agreement["id"])) == 2


def test_a_rejection_reason_shown_to_the_buyer_is_refused_with_invisible_format_characters(buyer_api, seller_api,
                                                                                           service):
    agreement = propose(buyer_api, service)
    refused = seller_api.put(f"/usage-agreements/{agreement['id']}/reject", {"reason": "booked \u202enuf"})
    assert refused.status_code == 400 and error_code(refused) == "unsafe_characters", refused.content
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "proposed"


@pytest.mark.parametrize(("field", "value"), [("note", "for \u202etest"), ("service_description", "q3\u200b report"),
                                              ("note", "urgent\x1b[31m")], ids=["note-bidi", "paegents-zero-width",
                                                                                 "note-escape"])
def test_a_proposals_note_shown_to_the_seller_is_refused_with_control_or_invisible_format_characters(
        buyer_api, service, field, value):
    """A proposal's `note` (the Pægents SDK's `service_description`) is what the seller reads of the buyer's order
    before it accepts: with a bidi override, a zero-width space or a terminal escape it read otherwise than written,
    where the seller's rejection reason is refused. 400 `unsafe_characters` naming the field, nothing proposed."""
    refused = buyer_api.post("/usage-agreements", proposal(service, **{field: value}))
    assert refused.status_code == 400 and error_code(refused) == "unsafe_characters", refused.content
    assert refused.json()["error"]["details"]["fields"] == [field], refused.content
    assert not UsageAgreement.objects.exists()
    kept = propose(buyer_api, service, note="two lines:\nfor the q3 report")
    assert kept["note"] == "two lines:\nfor the q3 report"


def test_buyer_cancels_before_activation_but_not_after(buyer_api, seller_api, service):
    agreement = propose(buyer_api, service)
    seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
    cancelled = buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel", {"reason": "changed my mind"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    active = propose(buyer_api, service)
    UsageAgreement.objects.filter(pk=active["id"]).update(status="active")  # activation is the escrow's job
    response = buyer_api.post(f"/usage-agreements/{active['id']}/cancel")
    assert response.status_code == 409 and error_code(response) == "invalid_transition"
    assert UsageAgreement.objects.get(pk=active["id"]).status == "active"


def test_roles_are_enforced(buyer_api, seller_api, service):
    agreement = propose(buyer_api, service)
    as_buyer = buyer_api.put(f"/usage-agreements/{agreement['id']}/accept")
    assert as_buyer.status_code == 403 and error_code(as_buyer) == "seller_only"
    as_seller = seller_api.post(f"/usage-agreements/{agreement['id']}/cancel")
    assert as_seller.status_code == 403 and error_code(as_seller) == "buyer_only"
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "proposed"


def test_strangers_get_404_not_403(buyer_api, service):
    agreement = propose(buyer_api, service)
    stranger = Api(issue_key(AgentFactory()))
    for response in (
        stranger.get(f"/usage-agreements/{agreement['id']}"),
        stranger.get(f"/usage-agreements/{agreement['id']}/events"),
        stranger.get(f"/usage-agreements/{agreement['id']}/usage"),
        stranger.put(f"/usage-agreements/{agreement['id']}/accept"),
        stranger.post(f"/usage-agreements/{agreement['id']}/cancel"),
    ):
        assert response.status_code == 404 and error_code(response) == "agreement_not_found"


def test_a_usage_page_checks_the_parties_without_reading_the_agreement(buyer_api, seller_api, service):
    """Reading the agreement with its parties and service, to check who may see its usage, was ~60% of a usage
    page's CPU (2.7 ms, in-process)."""
    agreement = propose(buyer_api, service)
    for party in (buyer_api, seller_api):
        with CaptureQueriesContext(connection) as captured:
            response = party.get(f"/usage-agreements/{agreement['id']}/usage")
        assert response.status_code == 200 and response.json()["results"] == []
        agreements, agents = (connection.ops.quote_name(model._meta.db_table) for model in (UsageAgreement, Agent))
        reads = [query["sql"] for query in captured.captured_queries if f"FROM {agreements}" in query["sql"]]
        assert len(reads) == 1 and agents not in reads[0]


def test_list_filters_by_role_and_status(buyer, buyer_api, seller_api, service):
    first = propose(buyer_api, service)
    propose(buyer_api, service)
    seller_api.put(f"/usage-agreements/{first['id']}/accept")
    mine = buyer_api.get("/usage-agreements", {"role": "buyer"}).json()["results"]
    assert len(mine) == 2
    assert buyer_api.get("/usage-agreements", {"role": "seller"}).json()["results"] == []
    accepted = seller_api.get("/usage-agreements", {"status": "accepted"}).json()["results"]
    assert [a["id"] for a in accepted] == [first["id"]]
    bad = buyer_api.get("/usage-agreements", {"status": "nope"})
    assert bad.status_code == 400


@pytest.mark.parametrize(("overrides", "code"), [
    ({"quantity": 0}, "min_value"),
    ({"quantity": -5}, "min_value"),
    ({"quantity": "ten"}, "invalid"),
    ({"expires_at": "yesterday"}, "invalid"),
    ({"buyer_wallet_address": "0xnope"}, "invalid_address"),
    ({"challenge_window_seconds": 1}, "min_value"),
    ({"surprise": 1}, "unknown_field"),
])
def test_proposal_validation(buyer_api, service, overrides, code):
    response = buyer_api.post("/usage-agreements", proposal(service, **overrides))
    assert code in codes_at(response)
    assert not UsageAgreement.objects.exists()


def test_proposal_rules(buyer, buyer_api, seller, service, settings):
    own = register_service(buyer_seller := AgentFactory(is_buyer=True, is_seller=True), skills=[])
    response = Api(issue_key(buyer_seller)).post("/usage-agreements", proposal(own))
    assert response.status_code == 400 and error_code(response) == "own_service"

    past = buyer_api.post("/usage-agreements", proposal(service, expires_at=(
        timezone.now() - timedelta(minutes=1)).isoformat()))
    assert error_code(past) == "expiry_in_past"

    token = buyer_api.post("/usage-agreements", proposal(service, token="EURC"))
    assert error_code(token) == "token_not_accepted"

    settings.AGREEMENT_MAX_AMOUNT = 1_000_000
    too_much = buyer_api.post("/usage-agreements", proposal(service, quantity=51))
    assert error_code(too_much) == "amount_too_large"

    free = register_service(seller, name="Free", skills=[], pricing={"type": "per_call", "unit_price_atomic": 0})
    assert error_code(buyer_api.post("/usage-agreements", proposal(free))) == "amount_zero"

    service.state = ServiceState.DEREGISTERED
    service.save()
    gone = buyer_api.post("/usage-agreements", proposal(service))  # to another owner's agent, as no service
    assert gone.status_code == 404 and error_code(gone) == "service_not_found"
    assert not UsageAgreement.objects.exists()


def test_a_deactivated_sellers_service_is_not_sold(buyer_api, seller, service):
    """A deactivated agent is hidden from search and its skills and keys are refused, but its services were still
    sold to any buyer naming them by id (and a Masumi service's purchase accepted at once on its behalf)."""
    Agent.objects.filter(pk=seller.pk).update(is_active=False)
    refused = buyer_api.post("/usage-agreements", proposal(service))
    assert refused.status_code == 404 and error_code(refused) == "service_not_found"
    assert not UsageAgreement.objects.exists()


def test_the_service_of_a_seller_whose_owner_is_deactivated_is_not_sold(buyer_api, seller, service):
    """The owner's account deactivated refuses its agents' keys, but their services were still sold by id."""
    seller.owner.is_active = False
    seller.owner.save()
    refused = buyer_api.post("/usage-agreements", proposal(service))
    assert refused.status_code == 404 and error_code(refused) == "service_not_found"
    assert not UsageAgreement.objects.exists()

    seller.owner.is_active = True
    seller.owner.save()
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201


def test_the_service_of_a_seller_whose_owner_is_deactivated_by_a_set_based_update_is_not_sold(buyer_api, seller,
                                                                                             service):
    """The agents' copy of the owner's activity (`Agent.owner_is_active`) was written by a receiver of the user's
    save only: an owner deactivated by a set-based update (a shell, a script, a bulk deactivation) kept selling
    until it was saved again. The database copies it now, whatever writes the user."""
    owners = type(seller.owner).objects.filter(pk=seller.owner.pk)
    owners.update(is_active=False)
    refused = buyer_api.post("/usage-agreements", proposal(service))
    assert refused.status_code == 404 and error_code(refused) == "service_not_found"

    owners.update(is_active=True)
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201


def test_an_agent_saved_from_a_stale_copy_or_given_to_another_owner_sells_as_its_owner_is_active(
        buyer_api, seller, service):
    """A save of an agent read before its owner was deactivated wrote the old copy of the owner's activity back, and
    an agent moved to a deactivated owner by an update kept its old owner's."""
    stale = Agent.objects.get(pk=seller.pk)
    type(seller.owner).objects.filter(pk=seller.owner.pk).update(is_active=False)
    stale.display_name = "Renamed"
    stale.save()
    assert not Agent.objects.get(pk=seller.pk).owner_is_active

    active_owner = UserFactory()
    Agent.objects.filter(pk=seller.pk).update(owner=active_owner)
    assert Agent.objects.get(pk=seller.pk).owner_is_active
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    inactive_owner = UserFactory(is_active=False)
    Agent.objects.filter(pk=seller.pk).update(owner=inactive_owner)
    assert not Agent.objects.get(pk=seller.pk).owner_is_active


def test_seller_only_agents_cannot_buy(seller_api, service):
    other_service = register_service(AgentFactory(is_seller=True), skills=[])
    response = seller_api.post("/usage-agreements", proposal(other_service))
    assert response.status_code == 403 and error_code(response) == "not_a_buyer"


def test_unanswered_proposals_expire(buyer_api, seller_api, service):
    stale = propose(buyer_api, service)
    fresh = propose(buyer_api, service)
    UsageAgreement.objects.filter(pk=stale["id"]).update(proposal_expires_at=timezone.now() - timedelta(seconds=1))

    assert expire_proposals() == 1
    assert expire_proposals() == 0
    assert UsageAgreement.objects.get(pk=stale["id"]).status == "expired"
    assert UsageAgreement.objects.get(pk=fresh["id"]).status == "proposed"
    late = seller_api.put(f"/usage-agreements/{stale['id']}/accept")
    assert late.status_code == 409


def test_proposals_whose_expiry_raises_do_not_keep_the_others_from_their_turn(buyer_api, service, monkeypatch):
    """A run of an expiry sweep takes a bounded batch (SWEEP_BATCH): due rows whose transition always raised stayed
    due, and, as many as the batch, were the ones taken at every run, so no other proposal (nor approval request)
    ever expired. Each run takes up after the last."""
    from marketplace import sweeps

    due = [propose(buyer_api, service)["id"] for _ in range(2)]
    UsageAgreement.objects.filter(pk__in=due).update(proposal_expires_at=timezone.now() - timedelta(seconds=1))
    monkeypatch.setattr(sweeps, "SWEEP_BATCH", 1)
    monkeypatch.setattr(agreement_services, "_transition",
                        first_row_always_fails(agreement_services._transition, row="agreement_id"))
    sweep_runs(expire_proposals, runs=2)
    assert sorted(UsageAgreement.objects.filter(pk__in=due).values_list("status", flat=True)) == [
        "expired", "proposed"]


def test_a_proposal_whose_expiry_raises_is_skipped_and_logged_and_the_others_still_expire(
        buyer_api, service, monkeypatch, caplog):
    """One due row whose transition always raised (bad data, a bug, another app's hook refusing it) stopped the
    sweep at every run: the rows come back in the same order, so none after it ever expired."""
    due = [propose(buyer_api, service)["id"] for _ in range(3)]
    UsageAgreement.objects.filter(pk__in=due).update(proposal_expires_at=timezone.now() - timedelta(seconds=1))
    poisoned = UsageAgreement.objects.filter(pk__in=due).values_list("pk", flat=True).first()  # the sweep's first
    real_transition = agreement_services._transition

    def transition(agreement_id, **kwargs):
        done = real_transition(agreement_id, **kwargs)
        if agreement_id == poisoned:
            raise RuntimeError("this row always fails")
        return done

    monkeypatch.setattr(agreement_services, "_transition", transition)

    with pytest.raises(RowsFailed) as failed:
        expire_proposals()
    assert failed.value.failed == [poisoned] and failed.value.applied == 2
    assert UsageAgreement.objects.get(pk=poisoned).status == "proposed"  # its own transaction rolled back
    assert not AgreementEvent.objects.filter(agreement_id=poisoned, to_status="expired").exists()
    assert set(UsageAgreement.objects.filter(pk__in=due, status="expired").values_list("pk", flat=True)) == (
        set(UsageAgreement.objects.filter(pk__in=due).values_list("pk", flat=True)) - {poisoned})
    assert str(poisoned) in caplog.text and "this row always fails" in caplog.text

    monkeypatch.setattr(agreement_services, "_transition", real_transition)  # its cause fixed: the next run expires it
    assert expire_proposals() == 1
    assert UsageAgreement.objects.get(pk=poisoned).status == "expired"


def test_accepting_a_proposal_past_its_ttl_expires_it(buyer_api, seller_api, service):
    agreement = propose(buyer_api, service)
    UsageAgreement.objects.filter(pk=agreement["id"]).update(
        proposal_expires_at=timezone.now() - timedelta(seconds=1))
    response = seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
    assert response.status_code == 409 and error_code(response) == "proposal_expired"
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "expired"


def test_idempotent_proposal(buyer_api, service):
    headers = {"Idempotency-Key": "p-1"}
    first = buyer_api.post("/usage-agreements", proposal(service, expires_at=None) | {"quantity": 3},
                           headers=headers)
    assert first.status_code == 400  # expires_at null is invalid: the key is released
    body = {"service_id": str(service.pk), "quantity": 3}
    one = buyer_api.post("/usage-agreements", body, headers=headers)
    two = buyer_api.post("/usage-agreements", body, headers=headers)
    assert one.status_code == two.status_code == 201 and one.json()["id"] == two.json()["id"]
    assert UsageAgreement.objects.count() == 1


def test_a_buyer_has_at_most_the_limits_unanswered_or_unfunded_agreements_with_one_seller(
        buyer, buyer_api, seller, seller_api, service, settings):
    """An escrow proposal costs the buyer nothing: without a bound, one buyer filled a seller's inbox, its listing
    and its webhooks with proposals it never meant to fund."""
    settings.UNFUNDED_AGREEMENTS_PER_SELLER = 2
    first = propose(buyer_api, service)
    second = propose(buyer_api, service)

    refused = buyer_api.post("/usage-agreements", proposal(service))
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "unfunded_agreements_limit_reached"
    assert refused.json()["error"]["details"] == {"max_unfunded_agreements": 2, "window_seconds": 3600}
    assert UsageAgreement.objects.filter(buyer=buyer, seller=seller).count() == 2

    # Another seller's services are still bought.
    other = register_service(AgentFactory(handle="seller-two", is_buyer=False, is_seller=True))
    propose(buyer_api, other)

    # An accepted agreement waiting for its funding still counts; one the seller rejected no longer does.
    assert seller_api.put(f"/usage-agreements/{first['id']}/accept").status_code == 200
    assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 409
    assert seller_api.put(f"/usage-agreements/{second['id']}/reject", {"reason": "no"}).status_code == 200
    propose(buyer_api, service)


def test_proposals_the_buyer_cancelled_or_let_expire_count_against_the_bound_for_an_hour(
        buyer, buyer_api, seller, service, settings):
    """Proposing and cancelling in a loop (or letting proposals lapse) went round the bound: each proposal and each
    cancel is an event in the seller's inbox, posted to each of its webhook subscriptions."""
    settings.UNFUNDED_AGREEMENTS_PER_SELLER = 2
    cancelled, lapsed = propose(buyer_api, service), propose(buyer_api, service)
    assert buyer_api.post(f"/usage-agreements/{cancelled['id']}/cancel", {}).status_code == 200
    UsageAgreement.objects.filter(pk=lapsed["id"]).update(proposal_expires_at=timezone.now())
    assert expire_proposals() == 1

    refused = buyer_api.post("/usage-agreements", proposal(service))
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "unfunded_agreements_limit_reached"
    assert refused.json()["error"]["details"] == {"max_unfunded_agreements": 2, "window_seconds": 3600}

    # An hour after their proposal they no longer count.
    UsageAgreement.objects.filter(buyer=buyer).update(created_at=timezone.now() - timedelta(hours=1, seconds=1))
    propose(buyer_api, service)


def _time_passes(agreement_id, by: timedelta) -> None:
    """The agreement's moments moved `by` into the past: as if `by` had passed since its proposal."""
    agreement = UsageAgreement.objects.get(pk=agreement_id)
    UsageAgreement.objects.filter(pk=agreement_id).update(
        created_at=agreement.created_at - by, expires_at=agreement.expires_at - by,
        proposal_expires_at=agreement.proposal_expires_at - by)


def test_a_proposal_cannot_be_accepted_after_its_term_ends(buyer_api, seller_api, service):
    """The acceptance window was 72 hours whatever the term: a seller accepted an agreement whose term had ended,
    which then stayed accepted, could not be activated, and counted against the buyer's caps until cancelled."""
    agreement = propose(buyer_api, service, expires_at=(timezone.now() + timedelta(hours=1)).isoformat())
    assert agreement["proposal_expires_at"] == agreement["expires_at"]

    _time_passes(agreement["id"], timedelta(hours=2))
    late = seller_api.put(f"/usage-agreements/{agreement['id']}/accept")
    assert late.status_code == 409, late.content
    assert error_code(late) == "proposal_expired"
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "expired"


def test_a_proposal_whose_term_ended_unanswered_expires_at_the_sweep(buyer_api, service):
    agreement = propose(buyer_api, service, expires_at=(timezone.now() + timedelta(hours=1)).isoformat())
    _time_passes(agreement["id"], timedelta(hours=2))
    assert expire_proposals() == 1
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "expired"


def test_an_accepted_agreement_whose_term_ended_unfunded_expires_at_the_sweep(buyer_api, seller_api, service):
    """Accepted and never funded, it stayed accepted after its term: it could never be activated (the contract
    refuses an escrow past its expiry) and only the buyer's cancel closed it."""
    agreement = propose(buyer_api, service)
    assert seller_api.put(f"/usage-agreements/{agreement['id']}/accept").status_code == 200
    _time_passes(agreement["id"], timedelta(days=3))
    assert expire_unfunded_past_term() == 1
    assert expire_unfunded_past_term() == 0
    expired = buyer_api.get(f"/usage-agreements/{agreement['id']}").json()
    assert expired["status"] == "expired"
    assert statuses(agreement["id"])[-1] == ("accepted", "expired")


def test_an_agreement_closed_for_a_reason_tells_its_code(buyer_api, seller_api, service):
    """status_code: the machine-readable code of the agreement's status_reason where the close has one (rejected,
    expired); empty where the reason is a party's own words alone (a cancel) or there is none."""
    rejected = propose(buyer_api, service)
    response = seller_api.put(f"/usage-agreements/{rejected['id']}/reject", {"reason": "fully booked"})
    assert response.json()["status_code"] == "rejected_by_seller", response.json()

    stale = propose(buyer_api, service)
    UsageAgreement.objects.filter(pk=stale["id"]).update(proposal_expires_at=timezone.now() - timedelta(seconds=1))
    expire_proposals()
    assert buyer_api.get(f"/usage-agreements/{stale['id']}").json()["status_code"] == "proposal_expired"
    event = AgreementEvent.objects.filter(agreement_id=stale["id"]).order_by("-pk").first()
    assert event.data == {"code": "proposal_expired"}

    cancelled = propose(buyer_api, service)
    response = buyer_api.post(f"/usage-agreements/{cancelled['id']}/cancel", {"reason": "changed my mind"})
    assert response.json()["status"] == "cancelled" and response.json()["status_code"] == ""
