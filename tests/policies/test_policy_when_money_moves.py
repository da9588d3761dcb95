"""The owner's policy holds again when the platform moves the buyer's money (escrow activation, a Masumi purchase's
lock-funds, a direct purchase's payment at accept), not only when the agreement is proposed."""

from datetime import timedelta

import pytest
from django.utils import timezone

from agreements.models import AgreementEvent, UsageAgreement
from escrow.models import ChainTransaction
from tests.agreements.test_direct_payments import Purchase as DirectPurchase
from tests.agreements.helpers import proposal
from tests.catalog.factories import AgentFactory, issue_owner_token, register_service
from tests.conftest import Api, error_code
from tests.escrow.flow import Parties, deadline_clock, mined_what_was_sent, sign_activation, usdc_balance
from tests.escrow.test_masumi_purchases import INPUT, PRICE
from tests.policies.helpers import whole_policy
from tests.support.at_once import answered_at_once

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

ONE_PROPOSAL = 300_000  # 10 calls at 0.02 USDC plus the 0.10 USDC minimum fee


@pytest.fixture
def parties(escrow_chain):
    return Parties(escrow_chain)  # 0.02 USDC per call


def set_policy(parties: Parties, body: dict) -> None:
    owner_api = Api(issue_owner_token(parties.buyer.owner))
    response = owner_api.put(f"/agents/{parties.buyer.pk}/policies", whole_policy(body))
    assert response.status_code == 200, response.content


def proposed_days_ago(parties: Parties, days: float) -> dict:
    agreement = parties.accepted_agreement()
    UsageAgreement.objects.filter(pk=agreement["id"]).update(created_at=timezone.now() - timedelta(days=days))
    return agreement


def activate(parties: Parties, agreement_id: str, capture):
    with capture(execute=True):
        return parties.buyer_api.post(f"/usage-agreements/{agreement_id}/activate-escrow",
                                      parties.signed_activation(agreement_id))


def assert_refused(response, rule: str) -> None:
    assert response.status_code == 403, response.content
    assert error_code(response) == "policy_denied"
    assert response.json()["error"]["details"]["rule"] == rule


def test_the_daily_cap_holds_when_escrows_proposed_on_different_days_are_activated_on_one(
        parties, django_capture_on_commit_callbacks):
    """The review's case: one cap's worth proposed on each of two days, both activated on a third; the caps were
    checked only at proposal, so twice the daily cap left the wallet at once."""
    capture = django_capture_on_commit_callbacks
    set_policy(parties, {"daily_cap_atomic": ONE_PROPOSAL})
    first = proposed_days_ago(parties, 2)
    second = proposed_days_ago(parties, 1.5)  # the first was out of the window: allowed

    assert activate(parties, first["id"], capture).status_code == 202  # the second counts at its proposal: gone
    refused = activate(parties, second["id"], capture)  # the first counts from now, when its money moved

    assert_refused(refused, "daily_cap")
    assert refused.json()["error"]["details"]["spent"] == ONE_PROPOSAL
    assert parties.agreement(second["id"])["status"] == "accepted"
    assert not ChainTransaction.objects.filter(agreement_id=second["id"]).exists()
    set_policy(parties, {"daily_cap_atomic": 2 * ONE_PROPOSAL})  # room in the window: it activates as it was
    assert activate(parties, second["id"], capture).status_code == 202


def test_a_policy_tightened_after_the_proposal_holds_at_activation(parties, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    agreement = parties.accepted_agreement()

    set_policy(parties, {"blocked_sellers": [parties.seller.handle]})
    assert_refused(activate(parties, agreement["id"], capture), "blocked_sellers")
    set_policy(parties, {"daily_cap_atomic": ONE_PROPOSAL - 1})
    assert_refused(activate(parties, agreement["id"], capture), "daily_cap")
    set_policy(parties, {"max_per_agreement_atomic": ONE_PROPOSAL - 1})
    assert_refused(activate(parties, agreement["id"], capture), "max_per_agreement")
    set_policy(parties, {"approval_threshold_atomic": ONE_PROPOSAL})  # no approval was given for it
    refused = activate(parties, agreement["id"], capture)
    assert refused.status_code == 403 and error_code(refused) == "approval_required"

    assert parties.agreement(agreement["id"])["status"] == "accepted"
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()
    set_policy(parties, {"daily_cap_atomic": ONE_PROPOSAL})  # the agreement itself is not counted twice
    assert activate(parties, agreement["id"], capture).status_code == 202


def test_an_approval_given_at_proposal_is_not_asked_again_at_activation(parties,
                                                                        django_capture_on_commit_callbacks):
    set_policy(parties, {"approval_threshold_atomic": ONE_PROPOSAL})
    created = parties.buyer_api.post("/usage-agreements", {"service_id": str(parties.service.pk), "quantity": 10})
    assert created.json()["status"] == "pending_approval"
    owner_api = Api(issue_owner_token(parties.buyer.owner))
    [approval] = owner_api.get(f"/agents/{parties.buyer.pk}/approvals").json()["results"]
    assert owner_api.post(f"/agents/{parties.buyer.pk}/approvals/{approval['id']}/approve").status_code == 200
    assert parties.seller_api.put(f"/usage-agreements/{created.json()['id']}/accept").status_code == 200

    assert activate(parties, created.json()["id"], django_capture_on_commit_callbacks).status_code == 202


def test_a_masumi_purchase_is_refused_at_lock_funds_by_a_policy_tightened_since(
        escrow_chain, django_capture_on_commit_callbacks):
    from tests.support.masumi_service import MasumiService

    seller_service = MasumiService().start()
    try:
        parties = Parties(escrow_chain, upstream_base_url=seller_service.url, upstream_protocol="masumi",
                          pricing={"type": "per_call", "unit_name": "job", "unit_price_atomic": PRICE,
                                   "token": "USDC"}, skills=[])
        now = deadline_clock(escrow_chain)
        timers = {"payByTime": now + 600, "submitResultTime": now + 1200, "unlockTime": now + 2400,
                  "externalDisputeUnlockTime": now + 4800}
        created = parties.buyer_api.post("/purchase", {
            "network": "Preprod", "agentIdentifier": str(parties.service.pk), "input_data": INPUT,
            "identifierFromPurchaser": "order-17", **{name: str(at * 1000) for name, at in timers.items()}})
        assert created.status_code == 200, created.content
        created = created.json()["data"]
        set_policy(parties, {"blocked_sellers": [parties.seller.handle]})

        signed = sign_activation(escrow_chain, created["ActivationPackage"],
                                 parties.agreement(created["agreementId"]), parties.buyer_account.key)
        with django_capture_on_commit_callbacks(execute=True):
            locked = parties.buyer_api.post("/purchase/lock-funds", {
                "network": "Preprod", "blockchainIdentifier": created["blockchainIdentifier"], **signed})

        assert_refused(locked, "blocked_sellers")
        assert parties.agreement(created["agreementId"])["status"] == "accepted"
        assert not ChainTransaction.objects.filter(agreement_id=created["agreementId"]).exists()
    finally:
        seller_service.stop()


def operators_retry(admin_client, failed, capture) -> str:
    """An operator's "retry" of the failed transaction in the admin: the page it answers, nothing run."""
    with capture(execute=False):
        return admin_client.post("/admin/escrow/chaintransaction/",
                                 {"action": "retry_failed", "_selected_action": [str(failed.pk)]},
                                 follow=True).content.decode()


def test_a_direct_purchase_is_not_paid_at_accept_past_a_cap_lowered_since(escrow_chain,
                                                                           django_capture_on_commit_callbacks):
    purchase = DirectPurchase(escrow_chain)
    parties = purchase.parties
    agreement = purchase.propose()
    before = purchase.balances()
    set_policy(parties, {"daily_cap_atomic": 1_000_000})

    with django_capture_on_commit_callbacks(execute=True):
        refused = parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")

    assert_refused(refused, "daily_cap")
    after = parties.agreement(agreement["id"])
    assert after["status"] == "proposed"  # the seller may accept again once the window has room
    event = AgreementEvent.objects.filter(agreement_id=agreement["id"]).order_by("created_at", "pk").last()
    assert "daily_cap" in event.reason and event.data["rule"] == "daily_cap"
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()
    assert purchase.balances() == before
    assert usdc_balance(escrow_chain, parties.seller_account.address) == before[1]

    set_policy(parties, {})
    assert purchase.accept(agreement["id"], django_capture_on_commit_callbacks)["status"] == "paying"


def test_an_operators_retry_of_a_failed_activation_holds_to_the_buyers_policy(
        parties, escrow_chain, monkeypatch, admin_client, django_capture_on_commit_callbacks):
    """The admin's retry re-sends the buyer's signed intent: the platform moves the money then, so the buyer's policy
    as it is now decides, as at activate-escrow. Refused, the operator is told the rule and nothing is queued;
    allowed, the agreement counts against the caps from the retry."""
    from escrow.models import TxPurpose, TxStatus
    from tests.escrow.test_relayer_faults import spent_by_the_buyer_once_estimated

    capture = django_capture_on_commit_callbacks
    agreement = parties.accepted_agreement()
    spent_by_the_buyer_once_estimated(escrow_chain, monkeypatch)
    parties.activate(agreement["id"], capture)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose=TxPurpose.ACTIVATE)
    assert failed.status == TxStatus.FAILED
    set_policy(parties, {"blocked_sellers": [parties.seller.handle]})

    refused = operators_retry(admin_client, failed, capture)
    assert "Queued 0 transaction(s) again." in refused and "blocked_sellers" in refused
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == 1
    assert parties.agreement(agreement["id"])["status"] == "activation_failed"

    set_policy(parties, {})
    before = timezone.now()
    assert "Queued 1 transaction(s) again." in operators_retry(admin_client, failed, capture)
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == 2
    assert UsageAgreement.objects.get(pk=agreement["id"]).funds_moved_at >= before


def test_an_operators_retry_of_a_failed_activation_holds_to_the_platform_limit_in_force(
        parties, escrow_chain, monkeypatch, settings, admin_client, django_capture_on_commit_callbacks):
    """The admin's retry re-sends the buyer's signed intent: the platform moves the money then, so the ceiling in
    force then (AGREEMENT_MAX_AMOUNT, lowered since the proposal) binds, as at activate-escrow: the operator is told
    `amount_too_large` and nothing is queued; at the limit it is sent again."""
    from escrow.models import TxPurpose, TxStatus
    from tests.escrow.test_relayer_faults import spent_by_the_buyer_once_estimated

    capture = django_capture_on_commit_callbacks
    agreement = parties.accepted_agreement()
    spent_by_the_buyer_once_estimated(escrow_chain, monkeypatch)
    parties.activate(agreement["id"], capture)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose=TxPurpose.ACTIVATE)
    assert failed.status == TxStatus.FAILED
    deposit = UsageAgreement.objects.get(pk=agreement["id"]).deposit_amount
    settings.AGREEMENT_MAX_AMOUNT = deposit - 1

    refused = operators_retry(admin_client, failed, capture)
    assert "Queued 0 transaction(s) again." in refused and "amount_too_large" in refused
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == 1
    assert parties.agreement(agreement["id"])["status"] == "activation_failed"

    settings.AGREEMENT_MAX_AMOUNT = deposit
    assert "Queued 1 transaction(s) again." in operators_retry(admin_client, failed, capture)
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == 2


def test_a_seller_accepting_a_refused_direct_purchase_again_adds_no_event_for_the_same_refusal(
        escrow_chain, django_capture_on_commit_callbacks):
    """Each refused accept recorded an event: a seller looping on accept wrote audit rows (and webhooks) without end.
    A refusal is recorded again only when it differs from the last one (its code or rule)."""
    purchase = DirectPurchase(escrow_chain)
    parties = purchase.parties
    agreement = purchase.propose()
    events = AgreementEvent.objects.filter(agreement_id=agreement["id"])

    def accept_refused(rule: str) -> None:
        with django_capture_on_commit_callbacks(execute=True):
            assert_refused(parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept"), rule)

    set_policy(parties, {"daily_cap_atomic": 1_000_000})
    accept_refused("daily_cap")
    recorded = events.count()
    for _ in range(3):
        accept_refused("daily_cap")
    assert events.count() == recorded

    set_policy(parties, {"blocked_sellers": [parties.seller.handle]})
    accept_refused("blocked_sellers")
    accept_refused("blocked_sellers")
    assert events.count() == recorded + 1
    set_policy(parties, {"daily_cap_atomic": 1_000_000})
    accept_refused("daily_cap")  # differs from the last one recorded
    assert events.count() == recorded + 2
    assert parties.agreement(agreement["id"])["status"] == "proposed"


def test_a_seller_refused_a_direct_purchase_by_the_buyers_policy_is_told_the_rule_not_the_buyers_spend_or_caps(
        escrow_chain, django_capture_on_commit_callbacks):
    """The seller's accept is refused by the buyer's owner policy: the seller (its answer, the agreement's events,
    which both parties read) learns which rule, not what the buyer committed with other sellers nor its owner's
    limits: a seller accepting again and again read the buyer's spending across the marketplace as it changed."""
    purchase = DirectPurchase(escrow_chain)
    parties = purchase.parties
    agreement = purchase.propose()
    elsewhere = register_service(AgentFactory(is_seller=True))
    assert parties.buyer_api.post("/usage-agreements", proposal(elsewhere)).status_code == 201
    set_policy(parties, {"daily_cap_atomic": 1_000_000})

    with django_capture_on_commit_callbacks(execute=True):
        refused = parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")

    assert_refused(refused, "daily_cap")
    assert refused.json()["error"]["details"] == {"rule": "daily_cap"}, refused.content
    trail = parties.seller_api.get(f"/usage-agreements/{agreement['id']}/events").json()["results"]
    assert trail[-1]["data"] == {"code": "policy_denied", "rule": "daily_cap"}


@pytest.mark.parametrize("step", ["direct_fee", "direct_payment"])
def test_an_operators_retry_of_a_failed_direct_purchase_step_holds_to_the_buyers_policy(
        escrow_chain, step, admin_client, django_capture_on_commit_callbacks):
    """The admin's retry of a direct purchase's failed fee collection or payment moves the buyer's money again (the
    fee permit's allowance, the x402 authorization): the buyer's policy as it is now decides, as at accept. Refused,
    the operator is told the rule and nothing is queued; allowed, the purchase counts against the caps from the
    retry."""
    from escrow.models import TxStatus
    from tests.escrow.flow import USDC, confirm_all, fund

    capture = django_capture_on_commit_callbacks
    purchase = DirectPurchase(escrow_chain)
    parties = purchase.parties
    fund(escrow_chain, purchase.treasury, USDC)  # the treasury's float for the fee's refund
    body = purchase.body()
    agreement = purchase.propose(body)
    usdc, buyer = escrow_chain.usdc, purchase.buyer.address
    held = usdc.functions.balanceOf(buyer).call()
    purchase.accept(agreement["id"], capture)
    if step == "direct_fee":  # the buyer empties the wallet before the fee is collected
        usdc.functions.transfer(escrow_chain.accounts.stranger.address, held).transact({"from": buyer})
        mined_what_was_sent()  # before the relayer reads the balance (Anvil answers a send before it mines it)
    confirm_all(capture)  # permit confirmed; the fee transfer is sent
    if step == "direct_payment":  # ... and the buyer cancels the payment before it runs
        purchase.cancel_authorization(body)
    for _ in range(2):
        confirm_all(capture)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose=step)
    assert failed.status == TxStatus.FAILED
    assert parties.agreement(agreement["id"])["status"] == "payment_failed"
    sent = ChainTransaction.objects.filter(agreement_id=agreement["id"]).count()
    set_policy(parties, {"blocked_sellers": [parties.seller.handle]})

    refused = operators_retry(admin_client, failed, capture)
    assert "Queued 0 transaction(s) again." in refused and "blocked_sellers" in refused
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == sent

    set_policy(parties, {})
    before = timezone.now()
    assert "Queued 1 transaction(s) again." in operators_retry(admin_client, failed, capture)
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == sent + 1
    assert UsageAgreement.objects.get(pk=agreement["id"]).funds_moved_at >= before


def test_a_direct_purchase_an_operator_sends_again_counts_against_the_caps_while_it_is_paid(
        escrow_chain, admin_client, django_capture_on_commit_callbacks):
    """A failed direct purchase (payment_failed) counts nothing against the caps: its money did not move. An
    operator's retry of its failed step moves it now: the purchase is paying again and counts from the retry, so the
    agent's next purchase is held to the cap with it (it stayed payment_failed, counted as nothing, and the agent
    spent a second cap's worth beside the retried payment)."""
    from escrow import relayer
    from escrow.models import TxStatus
    from tests.agreements.test_direct_payments import AMOUNT, FEE
    from tests.escrow.flow import USDC, confirm_all, fund

    capture = django_capture_on_commit_callbacks
    purchase = DirectPurchase(escrow_chain)
    parties = purchase.parties
    fund(escrow_chain, purchase.treasury, USDC)
    agreement = purchase.propose(purchase.body())
    usdc, buyer = escrow_chain.usdc, purchase.buyer.address
    held = usdc.functions.balanceOf(buyer).call()
    purchase.accept(agreement["id"], capture)
    usdc.functions.transfer(escrow_chain.accounts.stranger.address, held).transact({"from": buyer})
    mined_what_was_sent()  # before the relayer reads the balance (Anvil answers a send before it mines it)
    for _ in range(3):
        confirm_all(capture)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_fee")
    assert failed.status == TxStatus.FAILED
    assert parties.agreement(agreement["id"])["status"] == "payment_failed"
    usdc.functions.transfer(buyer, held).transact({"from": escrow_chain.accounts.stranger.address})
    mined_what_was_sent()
    set_policy(parties, {"daily_cap_atomic": AMOUNT + FEE + ONE_PROPOSAL - 1})

    assert "Queued 1 transaction(s) again." in operators_retry(admin_client, failed, capture)
    over = parties.buyer_api.post("/usage-agreements", {"service_id": str(parties.service.pk), "quantity": 10})
    assert_refused(over, "daily_cap")
    assert over.json()["error"]["details"]["spent"] == AMOUNT + FEE
    assert parties.agreement(agreement["id"])["status"] == "paying"

    [retry] = ChainTransaction.objects.filter(agreement_id=agreement["id"], purpose="direct_fee",
                                              status=TxStatus.QUEUED)
    relayer.transaction_submit(transaction_id=retry.pk)
    for _ in range(2):  # the fee's collection sent again, then the payment
        confirm_all(capture)
    assert parties.agreement(agreement["id"])["status"] == "paid"


def test_an_operators_retry_of_a_direct_purchase_is_refused_once_its_buyer_asked_to_cancel_the_authorization(
        escrow_chain, admin_client, django_capture_on_commit_callbacks):
    """A direct purchase's payment failed (its fee not collected) and the buyer asked the platform to cancel its
    payment authorization (queued, not mined yet). An operator's retry of the failed step, queued beside it, could be
    sent first and take the fee and pay the seller against the buyer's revocation: refused while the cancellation is
    under way or done, the operator told why, nothing queued."""
    from escrow.models import TxStatus
    from tests.agreements.test_direct_payments import _cancel_signature
    from tests.escrow.flow import USDC, confirm_all, fund

    capture = django_capture_on_commit_callbacks
    purchase = DirectPurchase(escrow_chain)
    fund(escrow_chain, purchase.treasury, USDC)
    agreement = purchase.propose(purchase.body())
    usdc, buyer = escrow_chain.usdc, purchase.buyer.address
    held = usdc.functions.balanceOf(buyer).call()
    purchase.accept(agreement["id"], capture)
    usdc.functions.transfer(escrow_chain.accounts.stranger.address, held).transact({"from": buyer})
    mined_what_was_sent()  # before the relayer reads the balance (Anvil answers a send before it mines it)
    for _ in range(3):
        confirm_all(capture)
    failed = ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_fee")
    assert failed.status == TxStatus.FAILED
    assert purchase.parties.agreement(agreement["id"])["status"] == "payment_failed"
    usdc.functions.transfer(buyer, held).transact({"from": escrow_chain.accounts.stranger.address})
    mined_what_was_sent()

    with capture(execute=False):
        cancel = purchase.parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                                 {"signature": _cancel_signature(purchase, agreement["id"])})
    assert cancel.status_code == 202, cancel.content
    sent = ChainTransaction.objects.filter(agreement_id=agreement["id"]).count()
    with capture(execute=False):
        page = admin_client.post("/admin/escrow/chaintransaction/",
                                 {"action": "retry_failed", "_selected_action": [str(failed.pk)]},
                                 follow=True).content.decode()
    assert "Queued 0 transaction(s) again." in page, page[page.find("messagelist"):][:1500]
    assert "cancel" in page
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == sent


def test_a_direct_purchase_of_a_buyer_deactivated_since_is_not_paid_at_accept(escrow_chain,
                                                                              django_capture_on_commit_callbacks):
    """An owner deactivating its agent stops what it buys: the seller's accept of a direct purchase the agent had
    proposed before paid it all the same (the policy was checked, not whether the buyer may still buy)."""
    from catalog.models import Agent

    purchase = DirectPurchase(escrow_chain)
    parties = purchase.parties
    agreement = purchase.propose()
    before = purchase.balances()
    Agent.objects.filter(pk=parties.buyer.pk).update(is_active=False)

    with django_capture_on_commit_callbacks(execute=True):
        refused = parties.seller_api.put(f"/usage-agreements/{agreement['id']}/accept")

    assert_refused(refused, "buyer_deactivated")
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "proposed"
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()
    assert purchase.balances() == before


def test_a_failed_direct_purchases_fee_counts_against_the_caps_until_it_is_refunded(
        escrow_chain, django_capture_on_commit_callbacks):
    """The buyer cancels its payment authorization once the fee is taken: the payment fails (payment_failed) and the
    treasury refunds the fee. Until that refund is mined the fee is out of the buyer's wallet, yet payment_failed
    counted nothing: the buyer spent past its cap by the fees in flight. It counts the fee until it is refunded."""
    from tests.agreements.test_direct_payments import FEE
    from tests.escrow.flow import USDC, confirm_all, fund

    capture = django_capture_on_commit_callbacks
    purchase = DirectPurchase(escrow_chain)
    parties = purchase.parties
    fund(escrow_chain, purchase.treasury, USDC)  # the platform treasury's float for refunds
    body = purchase.body()
    agreement = purchase.propose(body)
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the permit confirmed; the fee transfer is sent
    purchase.cancel_authorization(body)
    confirm_all(capture)  # the fee confirmed -> the payment refused at its simulation -> the fee's refund sent
    failed = parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed" and failed["buyer_refund_atomic"] is None, failed
    # Cancelled on-chain by the buyer itself: the platform counts its price until told (or its validBefore passed).
    # Asked to cancel it, it finds it cancelled already, and no longer counts the price.
    from tests.agreements.test_direct_payments import _cancel_signature
    again = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                   {"signature": _cancel_signature(purchase, agreement["id"])})
    assert again.status_code == 409 and error_code(again) == "authorization_already_used", again.content
    set_policy(parties, {"daily_cap_atomic": FEE + ONE_PROPOSAL - 1})
    escrow = {"service_id": str(parties.service.pk), "quantity": 10}

    over = parties.buyer_api.post("/usage-agreements", escrow)

    assert_refused(over, "daily_cap")
    assert over.json()["error"]["details"]["spent"] == FEE
    confirm_all(capture)  # the refund mined: the fee is back, and counts no more
    assert parties.agreement(agreement["id"])["buyer_refund_atomic"] == FEE
    assert parties.buyer_api.post("/usage-agreements", escrow).status_code == 201


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_escrow_activation_and_a_new_proposal_at_once_cannot_both_slip_under_the_daily_cap(parties):
    """Each alone fits the cap (the agreement activated was proposed two days ago, out of the window); together
    they are twice it. Sent at once, one connection per thread on PostgreSQL: the buyer's row lock, which both take
    before reading what it committed, lets one through."""
    set_policy(parties, {"daily_cap_atomic": ONE_PROPOSAL})
    old = proposed_days_ago(parties, 2)
    activation = parties.signed_activation(old["id"])

    answers = answered_at_once({
        "activation": lambda: Api(parties.buyer_api.secret).post(f"/usage-agreements/{old['id']}/activate-escrow",
                                                                 activation),
        "proposal": lambda: Api(parties.buyer_api.secret).post("/usage-agreements", proposal(parties.service))})

    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses in ({"activation": 202, "proposal": 403}, {"activation": 403, "proposal": 201}), [
        answer.content for answer in answers.values()]
    refused = next(answer for answer in answers.values() if answer.status_code == 403)
    assert refused.json()["error"]["details"]["rule"] == "daily_cap"


def test_a_direct_purchase_whose_payment_reverted_counts_its_price_while_its_authorization_can_still_pay(
        escrow_chain, monkeypatch, django_capture_on_commit_callbacks):
    """The buyer's wallet is emptied between the relayer's simulation of the payment and its mining: the payment
    reverts (payment_failed) and the fee is refunded, but the signed authorization is unused and valid, its calldata
    public, and anyone may get it mined once the wallet holds funds again (the seller is paid then). Its price was
    released at the revert: the buyer bought a cap's worth more, and the late use took the price on top, past the cap.
    It counts until the authorization can no longer pay: cancelled through the platform (or past its validBefore)."""
    from tests.agreements.test_direct_payments import AMOUNT, FEE, _cancel_signature, _use_authorization
    from tests.escrow.flow import USDC, confirm_all, fund

    from escrow import chain as gateway

    capture = django_capture_on_commit_callbacks
    purchase = DirectPurchase(escrow_chain)
    parties = purchase.parties
    fund(escrow_chain, purchase.treasury, USDC)  # the platform treasury's float for refunds
    set_policy(parties, {"daily_cap_atomic": AMOUNT + FEE})  # one direct purchase a day
    agreement = purchase.propose()
    purchase.accept(agreement["id"], capture)
    confirm_all(capture)  # the permit confirmed; the fee transfer is sent
    stranger = escrow_chain.accounts.stranger.address
    estimate = gateway.simulate

    def estimate_then_empty_the_wallet(**transaction):
        gas = estimate(**transaction)
        monkeypatch.setattr(gateway, "simulate", estimate)
        held = usdc_balance(escrow_chain, purchase.buyer.address)
        escrow_chain.usdc.functions.transfer(stranger, held).transact({"from": purchase.buyer.address})
        mined_what_was_sent()
        return gas

    monkeypatch.setattr(gateway, "simulate", estimate_then_empty_the_wallet)
    for _ in range(3):  # the fee confirmed -> the payment estimated, the wallet emptied, mined reverted -> refunded
        confirm_all(capture)
    failed = parties.agreement(agreement["id"])
    assert failed["status"] == "payment_failed" and failed["buyer_refund_atomic"] == FEE, failed
    assert ChainTransaction.objects.get(agreement_id=agreement["id"], purpose="direct_payment").receipt_status == 0
    escrow_chain.usdc.functions.transfer(purchase.buyer.address, usdc_balance(escrow_chain, stranger)).transact(
        {"from": stranger})  # the wallet holds funds again
    mined_what_was_sent()

    over = parties.buyer_api.post("/usage-agreements", purchase.body())

    assert_refused(over, "daily_cap")
    assert over.json()["error"]["details"]["spent"] == AMOUNT
    # Anyone may still get it paid, which is why it counted.
    before = usdc_balance(escrow_chain, parties.seller_account.address)
    snapshot = escrow_chain.w3.provider.make_request("evm_snapshot", [])["result"]
    _use_authorization(escrow_chain, agreement["id"], stranger)
    assert usdc_balance(escrow_chain, parties.seller_account.address) == before + AMOUNT
    escrow_chain.w3.provider.make_request("evm_revert", [snapshot])
    # Cancelled through the platform, it can no longer pay: the budget is back.
    with capture(execute=True):
        cancelled = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/cancel-payment-authorization",
                                           {"signature": _cancel_signature(purchase, agreement["id"])})
    assert cancelled.status_code == 202, cancelled.content
    confirm_all(capture)
    assert parties.buyer_api.post("/usage-agreements", purchase.body()).status_code == 201
