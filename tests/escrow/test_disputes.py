"""Challenges against a chain the platform's books lag behind: the seller's own proposal or re-proposal not indexed
yet, the indexer applying the buyer's challenge before the relayer's receipt does, a copy of the buyer's signed
challenge mined first, the window's last second; and a settlement tick that goes on past one agreement's failed
chain read."""

import io
import json

import pytest
from django.core.management import call_command

from agreements.models import UsageAgreement
from escrow import chain as gateway
from escrow import relayer, selectors, settlement
from escrow.models import ChainEvent, ChainTransaction, EventEffect, TxPurpose, TxStatus
from sdk.typed_data import sign_typed_data
from tests.conftest import codes_at, error_code
from tests.escrow.conftest import escrow_terms
from tests.escrow.flow import confirm_all, mined_what_was_sent
from tests.escrow.test_indexer import call_n, funded, index, seller_proposes_directly, statuses  # noqa: F401
from tests.escrow.test_relayer_faults import reverted_activation
from tests.escrow.test_settlement import staff_owner_api

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

REASON = "the last call answered nothing"


def challenge_body(parties, package: dict, reason: str = REASON) -> dict:
    return {"reason": reason, "evidence": "call 3", "deadline": package["deadline"],
            "signature": sign_typed_data(parties.buyer_account.key, package["challenge"])}


def test_a_buyer_challenges_a_proposal_the_seller_sent_itself_before_the_indexer_applied_it(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The seller called proposeSettlement itself and the indexer has not applied it yet: the window is open
    on-chain, so the platform reads the escrow from the chain rather than refuse, and the agreement ends disputed
    with the buyer's reason. The indexer applying both events later moves nothing twice."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain)
    onchain_deadline = chain.escrow.functions.getEscrow(funded.onchain_id,
                                                        escrow_terms(chain.escrow, funded.onchain_id)).call()[1]
    assert funded.agreement(funded.agreement_id)["status"] == "active"  # the indexer has not run

    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package")
    assert package.status_code == 200, package.content
    package = package.json()
    assert package["deadline"] == onchain_deadline
    with capture(execute=True):
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                         challenge_body(funded, package))
    assert response.status_code == 202, response.content
    confirm_all(capture)
    disputed = funded.agreement(funded.agreement_id)
    assert (disputed["status"], disputed["status_reason"]) == ("disputed", REASON)
    assert disputed["challenge_deadline"]

    index(capture)
    events = {event.name: event for event in ChainEvent.objects.filter(agreement_id=funded.agreement_id)}
    assert events["SettlementProposed"].effect == EventEffect.ALREADY
    assert events["Challenged"].effect == EventEffect.ALREADY
    assert statuses(funded.agreement_id)[-2:] == [("active", "in_challenge"), ("in_challenge", "disputed")]
    assert funded.agreement(funded.agreement_id)["status_reason"] == REASON
    call_command("reconcile")


def test_a_challenge_with_nothing_proposed_on_chain_either_is_refused(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """Consulting the chain opens no window that is not there: nothing proposed, nothing to challenge."""
    call_n(funded, 2)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package")
    assert package.status_code == 409 and error_code(package) == "invalid_transition"


def test_the_buyers_reason_is_kept_when_the_indexer_applies_its_challenge_first(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The relayer's challenge is mined and the indexer applies its Challenged event before the relayer's poll
    records the receipt: the agreement is disputed with the reason the buyer gave, not a generic one."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain)
    index(capture)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    with capture(execute=True):
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                         challenge_body(funded, package))
    assert response.status_code == 202, response.content
    mined_what_was_sent()
    index(capture)  # before the relayer's poll
    disputed = funded.agreement(funded.agreement_id)
    assert (disputed["status"], disputed["status_reason"]) == ("disputed", REASON)
    confirm_all(capture)
    assert funded.agreement(funded.agreement_id)["status_reason"] == REASON
    assert ChainEvent.objects.get(agreement_id=funded.agreement_id, name="Challenged").effect == EventEffect.APPLIED


def challenge_of_an_indexed_proposal(funded, chain, capture) -> dict:  # noqa: F811
    """Three calls, the seller's own proposal of them, indexed: the buyer's signed challenge body from its package."""
    call_n(funded, 3)
    seller_proposes_directly(funded, chain)
    index(capture)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    return challenge_body(funded, package)


def test_an_escrow_an_arbiter_settled_below_the_usage_charged_is_no_failure_on_the_dashboard(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):  # noqa: F811
    """Three calls charged (60000); the seller proposes its first receipt (20000), the buyer disputes it and the
    arbiter awards the seller 10000: settled below the usage at an earlier receipt than the last, as the failure
    "escrow settled below the usage charged" is, but a dispute's outcome is its own, so neither the dashboard nor
    reconcile lists it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=1)
    index(capture)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    with capture(execute=True):
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                         challenge_body(funded, package))
    assert response.status_code == 202, response.content
    confirm_all(capture)
    with capture(execute=True):
        response = staff_owner_api("change_dispute").post(f"/usage-agreements/{funded.agreement_id}/resolve",
                                                          {"seller_amount_atomic": 10_000})
    assert response.status_code == 202, response.content
    confirm_all(capture)  # resolve confirmed: settling, finalize queued
    confirm_all(capture)  # finalize confirmed: settled
    settled = UsageAgreement.objects.get(pk=funded.agreement_id)
    assert (settled.status, settled.seller_payout, settled.used, settled.proposed_seq, settled.usage_seq) == (
        "settled", 10_000, 60_000, 1, 3)

    failures = admin_client.get("/admin/dashboard/").context["failures"]
    assert [failure.kind for failure in failures if failure.subject == funded.agreement_id] == []
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    assert str(funded.agreement_id) not in out.getvalue()


def test_the_buyers_reason_is_kept_when_someone_else_sends_its_signed_challenge_first(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The buyer's signed challenge is bearer: a copy of it (read from the relayer's pending transaction) is mined
    first, ours reverts. The agreement still ends disputed for the reason the buyer gave."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    body = challenge_of_an_indexed_proposal(funded, chain, capture)
    with capture(execute=False) as submits:
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge", body)
    assert response.status_code == 202, response.content
    copied = chain.escrow.functions.challengeWithSig(
        funded.onchain_id, escrow_terms(chain.escrow, funded.onchain_id), body["deadline"], body["signature"],
    ).transact({"from": chain.accounts.stranger.address})
    assert chain.w3.eth.wait_for_transaction_receipt(copied)["status"] == 1
    with capture(execute=True):
        for submit in submits:
            submit()
    confirm_all(capture)
    [ours] = ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE)
    assert ours.status == TxStatus.FAILED and "InvalidState" in ours.failure_reason
    # Done by another: the agreement is disputed at once, and our revert is no failure for an operator.
    assert ours.outcome_evidence[settlement.DONE_BY] == copied.to_0x_hex()
    assert ours not in selectors.transactions_failed_recently(limit=10)
    disputed = funded.agreement(funded.agreement_id)
    assert (disputed["status"], disputed["status_reason"]) == ("disputed", REASON)
    index(capture)
    assert funded.agreement(funded.agreement_id)["status_reason"] == REASON
    call_command("reconcile")


def test_a_buyer_challenges_a_re_proposal_the_indexer_has_not_applied_after_the_first_window_closed(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The seller re-proposes a higher receipt just before the window closes, which restarts the window on-chain;
    the books still hold the first deadline, now past. The buyer challenges within the new window: the platform
    reads the chain's deadline rather than refuse challenge_window_closed."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=2)
    index(capture)
    first = int(UsageAgreement.objects.get(pk=funded.agreement_id).challenge_deadline.timestamp())
    chain.set_next_timestamp(first - 1)
    seller_proposes_directly(funded, chain, seq=3)
    chain.set_next_timestamp(first + 60)
    chain.mine(1)

    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package")
    assert package.status_code == 200, package.content
    assert package.json()["deadline"] == first - 1 + 3600
    with capture(execute=True):
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                         challenge_body(funded, package.json()))
    assert response.status_code == 202, response.content
    confirm_all(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"
    index(capture)
    assert funded.agreement(funded.agreement_id)["status_reason"] == REASON
    call_command("reconcile")


def test_a_dispute_in_the_sdks_shape_of_a_proposal_not_indexed_yet(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """POST /dispute without a signature answers what to sign, with the chain's window; with it, it is queued."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain)
    unsigned = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/dispute", {"reason": REASON})
    assert unsigned.status_code == 400 and error_code(unsigned) == "buyer_signature_required", unsigned.content
    details = unsigned.json()["error"]["details"]
    with capture(execute=True):
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/dispute", {
            "reason": REASON, "deadline": details["deadline"],
            "signature": sign_typed_data(funded.buyer_account.key, details["challenge"])})
    assert response.status_code == 202, response.content
    confirm_all(capture)
    disputed = funded.agreement(funded.agreement_id)
    assert (disputed["status"], disputed["status_reason"]) == ("disputed", REASON)


def test_a_challenge_no_block_can_carry_within_the_window_is_refused(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The latest block is the window's last second: any transaction sent now is mined at or after the deadline,
    where the contract refuses it (ChallengeWindowClosed). The platform says so (409) instead of answering 202 for
    a challenge that can only revert while the escrow is finalized."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain)
    index(capture)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    chain.set_next_timestamp(package["deadline"] - 1)
    chain.mine(1)
    with capture(execute=True):
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                         challenge_body(funded, package))
    assert response.status_code == 409 and error_code(response) == "challenge_window_closed", response.content


def two_agreements_due_to_finalize(funded, chain, capture) -> None:  # noqa: F811
    """A second funded agreement beside `funded`'s; both used, completed, proposed and past their window."""
    second = funded.accepted_agreement(quantity=100)
    funded.activate(second["id"], capture)
    for agreement_id in (funded.agreement_id, second["id"]):
        funded.agreement_id = agreement_id
        call_n(funded, 2)
        funded.buyer_api.post(f"/usage-agreements/{agreement_id}/complete")
    with capture(execute=True):
        assert settlement.settlement_tick()["proposed"] == 2
    confirm_all(capture)
    chain.increase_time(3601)


def test_one_agreement_whose_chain_read_fails_does_not_stop_the_settlement_of_the_others(
        funded, escrow_chain, django_capture_on_commit_callbacks, monkeypatch):  # noqa: F811
    """The settlement tick walks every agreement due: a chain read that fails for one (a node timing out on its
    logs, an escrow a reorg took) is logged and the tick goes on with the others, instead of raising at the first
    and leaving every agreement after it unsettled at every tick."""
    capture = django_capture_on_commit_callbacks
    two_agreements_due_to_finalize(funded, escrow_chain, capture)

    real, failing = selectors.escrow_terms, []

    def terms_of(*, agreement):
        if not failing or failing == [agreement.pk]:
            failing[:] = [agreement.pk]
            raise gateway.RpcUnavailable("read timed out")
        return real(agreement=agreement)

    monkeypatch.setattr(selectors, "escrow_terms", terms_of)
    with capture(execute=True):
        done = settlement.settlement_tick()
    confirm_all(capture)
    assert done["finalizing"] == 1
    statuses = {str(agreement.pk): agreement.status for agreement in UsageAgreement.objects.all()}
    assert statuses[str(failing[0])] == "in_challenge"
    assert [status for pk, status in statuses.items() if pk != str(failing[0])] == ["settled"]


def test_one_agreement_whose_settlement_step_raises_is_logged_and_skipped_and_the_others_are_settled(
        funded, escrow_chain, django_capture_on_commit_callbacks, monkeypatch, caplog):  # noqa: F811
    """Only a chain error let the tick go on: any other error for one agreement (bad data, a bug) raised out of
    the tick, and every agreement after it was never settled, at every tick."""
    from marketplace.sweeps import RowsFailed

    capture = django_capture_on_commit_callbacks
    two_agreements_due_to_finalize(funded, escrow_chain, capture)

    real, failing = selectors.escrow_terms, []

    def terms_of(*, agreement):
        if not failing or failing == [agreement.pk]:
            failing[:] = [agreement.pk]
            raise RuntimeError("this agreement always fails")
        return real(agreement=agreement)

    monkeypatch.setattr(selectors, "escrow_terms", terms_of)
    with capture(execute=True), pytest.raises(RowsFailed) as failed:
        settlement.settlement_tick()
    confirm_all(capture)
    assert failed.value.failed == failing and failed.value.applied == 1
    statuses = {str(agreement.pk): agreement.status for agreement in UsageAgreement.objects.all()}
    assert statuses[str(failing[0])] == "in_challenge"
    assert [status for pk, status in statuses.items() if pk != str(failing[0])] == ["settled"]
    assert str(failing[0]) in caplog.text and "this agreement always fails" in caplog.text


_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _v_zero_or_one(signature: str) -> str:
    raw = bytes.fromhex(signature[2:])
    return "0x" + (raw[:64] + bytes([raw[64] - 27])).hex()


def _high_s(signature: str) -> str:
    raw = bytes.fromhex(signature[2:])
    s = int.from_bytes(raw[32:64], "big")
    return "0x" + (raw[:32] + (_SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - raw[64]])).hex()


@pytest.mark.parametrize("spelling", [_v_zero_or_one, _high_s], ids=["v_0_or_1", "high_s"])
def test_a_challenge_signature_the_escrow_would_refuse_is_not_relayed(
        funded, escrow_chain, django_capture_on_commit_callbacks, spelling):  # noqa: F811
    """Python's recovery takes v as 0/1 and a high s (n - s) as the buyer's signature; the escrow (OpenZeppelin's
    ECDSA over the bytes as sent) refuses both. Relayed, the challenge reverted at the relayer's expense, the escrow
    stayed undisputed, and the buyer could send it again, as often as it liked within the window."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    body = challenge_of_an_indexed_proposal(funded, chain, capture)
    body["signature"] = spelling(body["signature"])
    with capture(execute=True):
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge", body)
    assert response.status_code == 400 and error_code(response) == "invalid_signature", response.content
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE).exists()


def test_a_challenge_signed_to_expire_before_it_can_be_mined_is_not_relayed(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The buyer picks the challenge's signature deadline: one a second past the next block passed the check, and
    reverted SignatureExpired once the relayer's send took longer (a queue, a gas bump, a busy chain), at the
    relayer's expense, the escrow still undisputed, so the buyer could ask again and again through the window. A
    deadline that leaves the relayer less than CHALLENGE_SIGNATURE_MIN_VALIDITY_SECONDS (or the window's end, if
    sooner) is refused; the package's deadline (the window's end) is taken."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain)
    index(capture)
    path = f"/usage-agreements/{funded.agreement_id}"
    package = funded.buyer_api.get(f"{path}/challenge-package").json()
    soon = chain.w3.eth.get_block("latest")["timestamp"] + 3
    hurried = {**package, "deadline": soon, "challenge": settlement.challenge_typed_data(
        agreement=UsageAgreement.objects.get(pk=funded.agreement_id), deadline=soon)}
    with capture(execute=True):
        refused = funded.buyer_api.post(f"{path}/challenge", challenge_body(funded, hurried))
    assert refused.status_code == 400 and error_code(refused) == "signature_expired", refused.content
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE).exists()

    with capture(execute=True):
        taken = funded.buyer_api.post(f"{path}/challenge", challenge_body(funded, package))
    assert taken.status_code == 202, taken.content


def test_a_node_that_cannot_be_reached_stops_the_settlement_tick_at_once(
        funded, escrow_chain, django_capture_on_commit_callbacks, monkeypatch):  # noqa: F811
    """One agreement's failed chain read is logged and the tick goes on; a node that cannot be reached at all
    (connection refused) fails every read: the tick stops at the first and the task retries later, as the relayer's
    poll does, rather than walking every agreement due, each waiting on the node, while the next ticks start."""
    capture = django_capture_on_commit_callbacks
    two_agreements_due_to_finalize(funded, escrow_chain, capture)

    reads = []

    def unreachable(*, agreement):
        reads.append(agreement.pk)
        raise gateway.RpcUnreachable("connection refused")

    monkeypatch.setattr(selectors, "escrow_terms", unreachable)
    with pytest.raises(gateway.RpcUnreachable):
        settlement.settlement_tick()
    assert len(reads) == 1


def test_a_challenge_the_escrow_would_revert_while_the_books_lag_is_refused_with_nothing_queued(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The buyer's signed challenge was sent by someone else (or the buyer itself) and the indexer has not applied
    it: the books still say in_challenge, so the API's checks pass, but the escrow refuses a second challenge
    (InvalidState). Relayed, it reverted at the relayer's expense, as often as the buyer asked. It is simulated
    first: 409 `transaction_would_revert` naming the revert, nothing queued."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    body = challenge_of_an_indexed_proposal(funded, chain, capture)
    sent = chain.escrow.functions.challengeWithSig(
        funded.onchain_id, escrow_terms(chain.escrow, funded.onchain_id), body["deadline"], body["signature"],
    ).transact({"from": chain.accounts.stranger.address})
    assert chain.w3.eth.wait_for_transaction_receipt(sent)["status"] == 1
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"  # the indexer has not run

    with capture(execute=True):
        refused = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge", body)
    assert refused.status_code == 409 and error_code(refused) == "transaction_would_revert", refused.content
    assert "InvalidState" in refused.json()["error"]["details"]["revert_reason"]
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE).exists()


def test_a_buyer_past_its_relay_revert_budget_still_challenges_a_settlement(
        funded, escrow_chain, settings, monkeypatch, django_capture_on_commit_callbacks):  # noqa: F811
    """The relay budget (RELAY_REVERTS_PER_PARTY) stops a buyer making its relayed purchases revert at the relayer's
    gas; a challenge is the buyer's defence against the seller's amount, within a window that may be an hour, and
    what makes one revert after its simulation is mostly not the buyer's doing (the relayer mining it after its
    deadline or the window). Refused once the buyer's activations had reverted, the seller's proposal was finalized
    unchallenged. A challenge is never refused by the budget nor charged to it."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.RELAY_REVERTS_PER_PARTY = 1
    settings.RELAY_IN_FLIGHT_PER_PARTY = 1
    body = challenge_of_an_indexed_proposal(funded, chain, capture)
    other = funded.accepted_agreement()
    reverted_activation(funded, chain, capture, monkeypatch, other["id"])

    with capture(execute=False):
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge", body)

    assert response.status_code == 202, response.content
    challenge = ChainTransaction.objects.get(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE)
    assert relayer.RELAYED_FOR not in challenge.context


def test_a_node_answering_a_pending_block_in_the_future_does_not_close_the_challenge_window_early(
        funded, escrow_chain, settings, django_capture_on_commit_callbacks):  # noqa: F811
    """The challenge API's "now" was the node's pending block's timestamp, unchecked: a node answering one past the
    window's end (a misbehaving provider, a clock gone wrong) had the buyer's challenge refused 409
    challenge_window_closed while the chain's window was open, and the seller's proposal finalized unchallenged. The
    pending timestamp is believed no further than the later of the latest block's and our clock's."""
    from tests.support.rpc_relay import node_block_times

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    body = challenge_of_an_indexed_proposal(funded, chain, capture)
    with node_block_times(escrow_chain.node.rpc_url, settings, pending=body["deadline"] + 3600):
        with capture(execute=True):
            response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge", body)
        assert response.status_code == 202, response.content
        confirm_all(capture)
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"


def test_a_challenge_accepted_in_the_windows_last_seconds_that_the_chain_refuses_is_told_to_the_buyer(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """The API takes the buyer's challenge (202) in the window's last seconds; the relayer gets to it after the window
    closed and the chain refuses it. The failed transaction changed nothing the buyer is sent: the agreement stayed
    in_challenge, no event, no webhook, until the seller's amount was finalized ("challenge window over"), as if the
    buyer had never challenged. The failure is an event of the agreement (its webhook and inbox), with the reason."""
    from agreements.models import AgreementEvent

    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    body = challenge_of_an_indexed_proposal(funded, chain, capture)
    with capture(execute=False) as submits:
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge", body)
    assert response.status_code == 202, response.content
    window_end = UsageAgreement.objects.get(pk=funded.agreement_id).challenge_deadline.timestamp()
    chain.increase_time(int(window_end) - chain.now() + 1)
    with capture(execute=True):
        for submit in submits:
            submit()
    confirm_all(capture)

    challenge = ChainTransaction.objects.get(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE)
    assert challenge.status == TxStatus.FAILED
    assert funded.agreement(funded.agreement_id)["status"] == "in_challenge"
    told = AgreementEvent.objects.filter(agreement_id=funded.agreement_id,
                                         data__challenge_failed=str(challenge.pk)).get()
    assert (told.from_status, told.to_status) == ("in_challenge", "in_challenge")
    assert "challenge" in told.reason and challenge.failure_reason in told.reason


def test_a_challenge_stuck_in_the_relayer_does_not_hold_back_the_sellers_higher_receipt_until_the_window_closes(
        funded, escrow_chain, django_capture_on_commit_callbacks, settings):  # noqa: F811
    """The seller proposed its first receipt of three; the buyer challenges through the API and the relayer does not
    get the challenge mined (its queue stuck: a gas spike, the node down, the fee cap). A challenge in flight held
    back the re-proposal of the seller's last receipt until the window closed, and the first receipt's amount was
    finalized: the seller underpaid though it held receipts for more. The challenge goes first while it can still land
    in the window; from CHALLENGE_REPROPOSE_MARGIN_SECONDS before its end the higher receipt is proposed (restarting
    the window), and the buyer's challenge, mined after it, disputes that one: both keep their right."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    settings.CHALLENGE_REPROPOSE_MARGIN_SECONDS = 60
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=1)
    index(capture)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    with capture(execute=False) as stuck:  # the relayer never gets to send it in time
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                         challenge_body(funded, package))
    assert response.status_code == 202, response.content
    window_end = int(UsageAgreement.objects.get(pk=funded.agreement_id).challenge_deadline.timestamp())

    with capture(execute=True):
        assert settlement.settlement_tick()["proposed"] == 0, "a re-proposal raced a challenge that can still land"
    chain.increase_time(window_end - 60 - chain.now())
    with capture(execute=True):
        assert settlement.settlement_tick()["proposed"] == 1, "the higher receipt was held back by a stuck challenge"
    confirm_all(capture)
    terms = escrow_terms(chain.escrow, funded.onchain_id)
    state, deadline, last_seq, amount = chain.escrow.functions.getEscrow(funded.onchain_id, terms).call()[:4]
    events = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/usage").json()["results"]
    third = next(event for event in events if event["seq"] == 3)
    assert (last_seq, amount) == (3, int(third["cumulative_atomic"])) and deadline > window_end

    with capture(execute=True):  # the relayer gets to the buyer's challenge at last: it disputes the higher receipt
        for submit in stuck:
            submit()
    confirm_all(capture)
    state, _deadline, last_seq, amount = chain.escrow.functions.getEscrow(funded.onchain_id, terms).call()[:4]
    assert (list(selectors.EscrowState)[state], last_seq) == (selectors.EscrowState.DISPUTED, 3)
    assert funded.agreement(funded.agreement_id)["status"] == "disputed"


def test_a_dispute_of_a_re_proposal_mined_before_the_challenge_shows_the_amount_the_chain_disputes(
        funded, escrow_chain, django_capture_on_commit_callbacks, admin_client):  # noqa: F811
    """The seller proposes its second receipt itself and the buyer challenges it through the API before the indexer
    applied it; the seller's re-proposal of its third receipt is mined before the relayer's challenge, which disputes
    whatever is proposed: the third. The relayer's receipt records the proposal it read when the challenge was queued
    (the second) and the agreement disputed, and the indexer, applying the third proposal after, left it there: the
    books showed the buyer, the seller and the arbiter's form the second receipt's amount and window while the chain
    disputes the third's."""
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    call_n(funded, 3)
    seller_proposes_directly(funded, chain, seq=2)
    package = funded.buyer_api.get(f"/usage-agreements/{funded.agreement_id}/challenge-package").json()
    with capture(execute=False) as submits:
        response = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/challenge",
                                         challenge_body(funded, package))
    assert response.status_code == 202, response.content
    seller_proposes_directly(funded, chain, seq=3)
    with capture(execute=True):
        for submit in submits:
            submit()
    confirm_all(capture)
    index(capture)

    terms = escrow_terms(chain.escrow, funded.onchain_id)
    assert tuple(chain.escrow.functions.getEscrow(funded.onchain_id, terms).call()[2:4]) == (3, 60_000)
    disputed = funded.agreement(funded.agreement_id)
    assert (disputed["status"], disputed["proposed_atomic"]) == ("disputed", 60_000)
    agreement = UsageAgreement.objects.get(pk=funded.agreement_id)
    assert agreement.proposed_seq == 3
    assert agreement.proposed_amount == 60_000
    call_command("reconcile")


@pytest.mark.parametrize(("path", "field", "value"), [
    ("challenge", "reason", "the last call\u202e answered nothing"), ("dispute", "reason", "the last call\u200b failed"),
    ("challenge", "evidence", "call 3\x1b[2J"), ("dispute", "evidence", "call 3\u2066")],
    ids=["challenge-reason-bidi", "dispute-reason-zero-width", "challenge-evidence-escape", "dispute-evidence-isolate"])
def test_a_disputes_reason_shown_to_the_seller_is_refused_with_control_or_invisible_format_characters(
        funded, escrow_chain, django_capture_on_commit_callbacks, path, field, value):  # noqa: F811
    """The buyer's reason becomes the agreement's `status_reason`, which the seller reads (its agreement, webhooks,
    inbox), and the evidence is kept for the arbiter: with a bidi override, a zero-width space or a terminal escape
    they read otherwise than written, where a rejection's or a completion's reason is refused. 400
    `unsafe_characters` naming the field, nothing queued; prose keeps its lines. (Evidence given as an object is kept
    as its JSON, escaped.)"""
    body = challenge_of_an_indexed_proposal(funded, escrow_chain, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        refused = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/{path}", {**body, field: value})
    assert refused.status_code == 400 and error_code(refused) == "unsafe_characters", refused.content
    assert refused.json()["error"]["details"]["fields"] == [field], refused.content
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE).exists()
    with django_capture_on_commit_callbacks(execute=True):
        kept = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/{path}",
                                     {**body, "reason": "the last call\nanswered nothing", "evidence": "call\t3"})
    assert kept.status_code == 202, kept.content


def test_a_disputes_evidence_object_too_long_to_keep_is_refused_not_cut(
        funded, escrow_chain, django_capture_on_commit_callbacks):  # noqa: F811
    """Evidence given as an object (the Pægents SDK's `evidence` dict) was kept as the first 5000 characters of its
    JSON, cut mid-value: the arbiter read a part of it as the whole. Refused as a text of that length is (400
    `max_length`), nothing queued; one that fits is kept whole."""
    body = challenge_of_an_indexed_proposal(funded, escrow_chain, django_capture_on_commit_callbacks)
    refused = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/dispute",
                                    {**body, "evidence": {"calls": ["no answer"] * 500}})
    assert codes_at(refused, "evidence") == {"max_length"}, refused.content
    assert not ChainTransaction.objects.filter(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE).exists()
    with django_capture_on_commit_callbacks(execute=True):
        kept = funded.buyer_api.post(f"/usage-agreements/{funded.agreement_id}/dispute",
                                     {**body, "evidence": {"calls": ["no answer"] * 3}})
    assert kept.status_code == 202, kept.content
    challenge = ChainTransaction.objects.get(agreement_id=funded.agreement_id, purpose=TxPurpose.CHALLENGE)
    assert json.loads(challenge.context["evidence"]) == {"calls": ["no answer"] * 3}
