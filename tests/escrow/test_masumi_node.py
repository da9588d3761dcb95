"""The Masumi node endpoints' rules that need no seller server: the connect seed's payment information, the
seller's payment requests and the checks on a purchase that pays one, Cardano-only fields, trailing slashes,
refund requests without a signature. (The published clients drive the whole flows in tests/compat.)"""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from escrow.models import MasumiPurchase
from sdk.typed_data import sign_typed_data
from tests.catalog.factories import AgentFactory, issue_key, issue_owner_token
from tests.conftest import Api, error_code
from tests.escrow.flow import USDC, Parties, confirm_all, deadline_clock

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

PRICE = 5 * USDC
INPUT = {"text": "the quarterly report"}
INPUT_HASH = "a" * 64


@pytest.fixture
def parties(escrow_chain):
    return Parties(escrow_chain, upstream_base_url="http://127.0.0.1:9", upstream_protocol="masumi",
                   masumi_protocol_version="2", skills=[],
                   pricing={"type": "per_call", "unit_name": "job", "unit_price_atomic": PRICE, "token": "USDC"})


def iso(unix: int) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def payment_request(parties, pay_by: int, **overrides) -> dict:
    """POST /payment/ as the masumi library's seller server sends it (ISO times, Cardano payment type)."""
    response = parties.seller_api.post("/payment/", {
        "agentIdentifier": str(parties.service.pk), "network": "Preprod", "paymentType": "Web3CardanoV1",
        "payByTime": iso(pay_by), "submitResultTime": iso(pay_by + 3600),
        "identifierFromPurchaser": "order-9", "inputHash": INPUT_HASH, **overrides})
    assert response.status_code == 200, response.content
    return response.json()["data"]


def paying_body(parties, payment: dict, **overrides) -> dict:
    """POST /purchase/ as the masumi library's Purchase sends it."""
    return {"identifierFromPurchaser": "order-9", "network": "Preprod", "sellerVkey": payment["sellerVKey"],
            "paymentType": "Web3CardanoV1", "blockchainIdentifier": payment["blockchainIdentifier"],
            "agentIdentifier": str(parties.service.pk), "inputHash": INPUT_HASH,
            **{name: payment[name] for name in ("payByTime", "submitResultTime", "unlockTime",
                                                "externalDisputeUnlockTime")}, **overrides}


def test_payment_information_answers_for_a_listed_service(parties, escrow_chain):
    """The connect seed's step 1 (GET /payment-information), in this network's terms."""
    response = parties.buyer_api.get("/payment-information", {"agentIdentifier": str(parties.service.pk)})
    assert response.status_code == 200, response.content
    info = response.json()["data"]
    assert info["sellerVkey"] == parties.seller_account.address
    assert info["AgentPricing"]["Pricing"] == [{"unit": "USDC", "amount": str(PRICE)}]
    assert info["token"] == escrow_chain.addresses["usdc"]
    assert info["PaymentSource"]["smartContractAddress"] == escrow_chain.addresses["escrow"]
    assert info["masumiProtocolVersion"] == "2" and info["purchaseUrl"].endswith("/purchase")
    plain = Parties(escrow_chain, buyer_funds=0, skills=[])
    refused = parties.buyer_api.get("/payment-information/", {"agentIdentifier": str(plain.service.pk)})
    assert refused.status_code == 400 and error_code(refused) == "not_a_masumi_service"


def test_a_payment_request_is_paid_by_a_purchase_that_matches_it(parties, escrow_chain):
    pay_by = deadline_clock(escrow_chain) + 600
    payment = payment_request(parties, pay_by)
    assert payment["onChainState"] is None and payment["inputHash"] == INPUT_HASH
    assert payment["payByTime"] == str(pay_by * 1000)  # ISO in, Masumi's milliseconds out
    assert payment["RequestedFunds"] == [{"amount": str(PRICE), "unit": "USDC"}]

    for field, value, code in [("identifierFromPurchaser", "someone-else", "payment_mismatch"),
                               ("inputHash", "b" * 64, "payment_mismatch"),
                               ("sellerVkey", parties.buyer_account.address, "payment_mismatch"),
                               ("submitResultTime", str((pay_by + 3601) * 1000), "payment_mismatch"),
                               ("paymentType", "Web3CardanoV2", "unsupported_payment_type"),
                               ("smartContractAddress", "addr_test1wz", "wrong_smart_contract"),
                               ("Amounts", [{"amount": "5000000", "unit": "lovelace"}], "requested_funds_mismatch")]:
        refused = parties.buyer_api.post("/purchase/", paying_body(parties, payment, **{field: value}))
        assert refused.status_code == 400 and error_code(refused) == code, (field, refused.content)
    both = parties.buyer_api.post("/purchase/", paying_body(parties, payment, input_data=INPUT))
    assert both.status_code == 400

    created = parties.buyer_api.post("/purchase/", paying_body(parties, payment))
    assert created.status_code == 200, created.content
    purchase = created.json()["data"]
    assert purchase["blockchainIdentifier"] == payment["blockchainIdentifier"] and purchase["inputHash"] == INPUT_HASH
    assert purchase["ActivationPackage"]["deadline"] == pay_by
    again = parties.buyer_api.post("/purchase/", paying_body(parties, payment))
    assert again.status_code == 409 and error_code(again) == "payment_already_purchased"
    assert again.json()["error"]["details"] == {"purchase_id": purchase["id"]}  # a retry whose answer was lost
    stranger = Api(issue_key(AgentFactory(owner=parties.buyer.owner, is_buyer=True)))
    told = stranger.post("/purchase/", paying_body(parties, payment))
    assert (told.status_code, error_code(told), told.json()["error"]["details"]) == (
        409, "payment_already_purchased", {})  # another buyer's purchase: not named

    seller_view = parties.seller_api.post("/payment/resolve-blockchain-identifier/", {
        "network": "Preprod", "blockchainIdentifier": payment["blockchainIdentifier"], "includeHistory": "false"})
    assert seller_view.status_code == 200 and seller_view.json()["data"]["id"] == purchase["id"]
    early = parties.seller_api.post("/payment/submit-result", {
        "network": "Preprod", "blockchainIdentifier": payment["blockchainIdentifier"], "submitResultHash": "c" * 64})
    assert early.status_code == 409 and error_code(early) == "funds_not_locked"
    listed = parties.seller_api.get("/payment/", {"network": "Preprod"})
    assert [p["id"] for p in listed.json()["data"]["Payments"]] == [purchase["id"]]
    by_id = parties.buyer_api.get(f"/purchase/{purchase['id']}/")
    assert by_id.status_code == 200 and by_id.json()["data"]["blockchainIdentifier"] == payment["blockchainIdentifier"]


def test_only_the_seller_requests_payments_for_its_service_at_its_price(parties):
    stranger = parties.buyer_api.post("/payment/", {
        "agentIdentifier": str(parties.service.pk), "network": "Preprod", "identifierFromPurchaser": "x"})
    assert stranger.status_code == 404 and error_code(stranger) == "service_not_found"
    lovelace = parties.seller_api.post("/payment/", {
        "agentIdentifier": str(parties.service.pk), "network": "Preprod", "identifierFromPurchaser": "x",
        "RequestedFunds": [{"amount": "10000000", "unit": "lovelace"}]})
    assert lovelace.status_code == 400 and error_code(lovelace) == "requested_funds_mismatch"
    unknown = parties.buyer_api.post("/payment/resolve-blockchain-identifier", {
        "network": "Preprod", "blockchainIdentifier": "0x" + "1" * 64})
    assert unknown.status_code == 404 and error_code(unknown) == "payment_not_found"
    sources = parties.seller_api.get("/payment-source/", {"take": "10"})
    assert sources.status_code == 200
    [source] = sources.json()["data"]["PaymentSources"]
    assert source["SellingWallets"][0]["walletVkey"] == parties.seller_account.address


def test_a_payment_request_is_paid_at_the_price_it_requested_not_one_the_seller_set_since(parties, escrow_chain):
    """The seller hands the buyer a payment request at its listed price, then raises the price: the purchase paying
    the request was made at the new price (the masumi library's buyer names no amount), and the request showed the
    new price to whoever resolved it."""
    payment = payment_request(parties, deadline_clock(escrow_chain) + 600)
    raised = parties.seller_api.patch(f"/agents/services/{parties.service.pk}", {"pricing": {
        "type": "per_call", "unit_name": "job", "unit_price_atomic": 100 * PRICE, "token": "USDC"}})
    assert raised.status_code == 200, raised.content

    refused = parties.buyer_api.post("/purchase/", paying_body(parties, payment))
    assert refused.status_code == 409 and error_code(refused) == "payment_price_changed", refused.content
    assert refused.json()["error"]["details"] == {"requested": [{"amount": str(PRICE), "unit": "USDC"}],
                                                  "listed": [{"amount": str(100 * PRICE), "unit": "USDC"}]}
    resolved = parties.seller_api.post("/payment/resolve-blockchain-identifier/", {
        "network": "Preprod", "blockchainIdentifier": payment["blockchainIdentifier"]})
    assert resolved.json()["data"]["RequestedFunds"] == [{"amount": str(PRICE), "unit": "USDC"}]


def test_a_blockchain_identifier_above_128_bits_names_no_purchase_nor_payment(parties):
    """An id of ours is a UUID (128 bits); any other bytes32 (another node's agreementId) matched every purchase
    that pays no payment request, as `agreement IS NULL OR payment_request IS NULL`."""
    created = parties.buyer_api.post("/purchase/", {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                                    "input_data": INPUT})
    assert created.status_code == 200, created.content
    foreign = "0x" + "ab" * 32
    bought = parties.buyer_api.get("/purchase/", {"network": "Preprod", "blockchainIdentifier": foreign})
    assert bought.status_code == 404 and error_code(bought) == "purchase_not_found", bought.content
    sold = parties.seller_api.post("/payment/resolve-blockchain-identifier/", {
        "network": "Preprod", "blockchainIdentifier": foreign})
    assert sold.status_code == 404 and error_code(sold) == "payment_not_found", sold.content


def test_a_refund_request_without_a_signature_is_recorded_and_can_be_withdrawn(parties, escrow_chain,
                                                                               django_capture_on_commit_callbacks):
    from tests.escrow.flow import confirm_all

    beyond = parties.buyer_api.post("/purchase", {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                                 "input_data": INPUT, "externalDisputeUnlockTime": "9" * 16})
    assert beyond.status_code == 400, beyond.content  # past year 9999: was a 500
    created = parties.buyer_api.post("/purchase", {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                                  "input_data": INPUT})
    assert created.status_code == 200, created.content
    purchase = created.json()["data"]
    assert len(purchase["identifierFromPurchaser"]) == 26  # generated, as the masumi library's buyers do
    signed = parties.signed_purchase(purchase)
    bad = sign_typed_data(escrow_chain.accounts.stranger.key, purchase["refundRequestTypedData"])
    body = {"network": "Preprod", "blockchainIdentifier": purchase["blockchainIdentifier"]}
    wrong = parties.buyer_api.post("/purchase/lock-funds", {**body, **signed, "refundSignature": bad})
    assert wrong.status_code == 400 and error_code(wrong) == "wrong_signer"
    with django_capture_on_commit_callbacks(execute=True):
        locked = parties.buyer_api.post("/purchase/lock-funds", {**body, **signed})
    assert locked.status_code == 202, locked.content
    confirm_all(django_capture_on_commit_callbacks)

    requested = parties.buyer_api.post("/purchase/request-refund/", body)
    assert requested.status_code == 200, requested.content
    recorded = requested.json()["data"]
    assert recorded["onChainState"] == "RefundRequested"
    assert recorded["NextAction"]["errorType"] == "RefundSignatureMissing"
    stranger = Api(parties.seller_api.secret).post("/purchase/cancel-refund-request", body)
    assert stranger.status_code == 404 and error_code(stranger) == "purchase_not_found"
    withdrawn = parties.buyer_api.post("/purchase/cancel-refund-request/", body)
    assert withdrawn.status_code == 200, withdrawn.content
    assert withdrawn.json()["data"]["onChainState"] == "FundsLocked"
    assert withdrawn.json()["data"]["refundRequestedAt"] is None


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_creating_purchases_and_payment_requests_asks_the_chain_with_no_database_transaction_open(
        parties, escrow_chain, settings):
    """The chain's clock, the buyer's permit nonce and the token's EIP-712 domain were read inside the purchase's
    transaction (under the payment request's and the buyer's row locks), and inside the idempotent request's
    transaction with an Idempotency-Key."""
    from tests.escrow.test_masumi_purchases import ChainCallsWatch

    watch = ChainCallsWatch(escrow_chain, settings)
    try:
        body = {"network": "Preprod", "agentIdentifier": str(parties.service.pk), "input_data": INPUT}
        plain = parties.buyer_api.post("/purchase", body)
        assert plain.status_code == 200, plain.content
        assert watch.taken() == []
        keyed = parties.buyer_api.post("/purchase", body, headers={"Idempotency-Key": "purchase-1"})
        assert keyed.status_code == 200, keyed.content
        assert watch.taken() == []
        replay = parties.buyer_api.post("/purchase", body, headers={"Idempotency-Key": "purchase-1"})
        assert replay.json() == keyed.json() and replay["Idempotent-Replayed"] == "true"

        pay_by = deadline_clock(escrow_chain) + 600
        requested = parties.seller_api.post("/payment/", {
            "agentIdentifier": str(parties.service.pk), "network": "Preprod", "payByTime": iso(pay_by),
            "submitResultTime": iso(pay_by + 3600), "identifierFromPurchaser": "order-9", "inputHash": INPUT_HASH},
            headers={"Idempotency-Key": "payment-1"})
        assert requested.status_code == 200, requested.content
        assert watch.taken() == []
        paid = parties.buyer_api.post("/purchase/", paying_body(parties, requested.json()["data"]),
                                      headers={"Idempotency-Key": "purchase-2"})
        assert paid.status_code == 200, paid.content
        assert paid.json()["data"]["ActivationPackage"]["deadline"] == pay_by
        assert watch.taken() == []
    finally:
        watch.relay.stop()


def test_a_timer_of_zero_is_refused_not_replaced_by_the_default(parties):
    """"0" (the epoch, or any count under 1000 ms) read as 0 s, which counted as a timer left out: the purchase or
    payment request got the default timer instead of the one asked for."""
    for path, api, body in [("/purchase", parties.buyer_api, {"input_data": INPUT}),
                            ("/payment", parties.seller_api, {"identifierFromPurchaser": "order-9"})]:
        for name in ("payByTime", "submitResultTime", "unlockTime", "externalDisputeUnlockTime"):
            for value in ("0", "999", 0):
                refused = api.post(path, {"network": "Preprod", "agentIdentifier": str(parties.service.pk), **body,
                                          name: value})
                assert refused.status_code == 400 and error_code(refused) == "invalid_timers", (
                    path, name, value, refused.content)


def test_a_seller_cannot_put_a_disputes_release_to_the_buyer_out_of_reach(parties, escrow_chain):
    """externalDisputeUnlockTime, the buyer's only release from a dispute nobody resolves (the contract has no
    dispute timeout), was unbounded: a payment request asking for the year 9999, which the masumi library's buyer
    copies into its purchase, left a disputed buyer's money to the operators alone."""
    pay_by = deadline_clock(escrow_chain) + 600
    unlock = pay_by + 7200
    body = {"agentIdentifier": str(parties.service.pk), "network": "Preprod", "identifierFromPurchaser": "order-9",
            "payByTime": iso(pay_by), "submitResultTime": iso(pay_by + 3600), "unlockTime": iso(unlock)}
    for api, path, extra in [(parties.seller_api, "/payment/", {}), (parties.buyer_api, "/purchase/", {"input_data": INPUT})]:
        far = api.post(path, {**body, **extra, "externalDisputeUnlockTime": "9999-12-31T23:59:59.000Z"})
        assert far.status_code == 400 and error_code(far) == "invalid_timers", (path, far.content)
        assert far.json()["error"]["details"]["timer"] == "external_dispute_unlock_time"
        at_most = api.post(path, {**body, **extra, "externalDisputeUnlockTime": iso(unlock + 30 * 24 * 3600)})
        assert at_most.status_code == 200, (path, at_most.content)


def test_the_seller_side_lists_take_integers_in_ascii_digits_only(parties):
    """`limit` of GET /payment and `take` of GET /payment-source took "1.0" and non-ASCII digits ("٣"), unlike every
    other integer in a query string."""
    for value in ("1.0", "٣", "1e1", " 3"):
        listed = parties.seller_api.get("/payment/", {"network": "Preprod", "limit": value})
        assert listed.status_code == 400, (value, listed.content)
        sources = parties.seller_api.get("/payment-source/", {"take": value})
        assert sources.status_code == 400, (value, sources.content)
    assert parties.seller_api.get("/payment/", {"network": "Preprod", "limit": "3"}).status_code == 200
    assert parties.seller_api.get("/payment-source/", {"take": "3"}).status_code == 200


def locked_purchase(parties, capture) -> tuple[dict, dict]:
    """A purchase with input_data, its funds locked without a refundSignature; (purchase, reference body)."""
    from tests.escrow.flow import confirm_all

    created = parties.buyer_api.post("/purchase", {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                                  "input_data": INPUT})
    assert created.status_code == 200, created.content
    purchase = created.json()["data"]
    body = {"network": "Preprod", "blockchainIdentifier": purchase["blockchainIdentifier"]}
    with capture(execute=True):
        locked = parties.buyer_api.post("/purchase/lock-funds", {**body, **parties.signed_purchase(purchase)})
    assert locked.status_code == 202, locked.content
    confirm_all(capture)
    return purchase, body


def test_a_refund_request_made_without_a_signature_takes_the_one_signed_afterwards(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """The masumi library's request-refund has no signature, and its NextAction says to sign refundRequestTypedData
    and PATCH /purchase: that PATCH was a no-op (200, RefundSignatureMissing still), since a refund already
    requested returned at once, so the buyer waited for reclaim after the contract's grace; a stranger's signature
    was answered 200 as well."""
    purchase, body = locked_purchase(parties, django_capture_on_commit_callbacks)
    unsigned = parties.buyer_api.post("/purchase/request-refund/", body)
    assert unsigned.json()["data"]["NextAction"]["errorType"] == "RefundSignatureMissing"
    stranger = sign_typed_data(escrow_chain.accounts.stranger.key, purchase["refundRequestTypedData"])
    wrong = parties.buyer_api.patch("/purchase", {**body, "signature": stranger})
    assert wrong.status_code == 400 and error_code(wrong) == "wrong_signer", wrong.content
    signed = parties.buyer_api.patch("/purchase", {
        **body, "signature": sign_typed_data(parties.buyer_account.key, purchase["refundRequestTypedData"])})
    assert signed.status_code == 200, signed.content
    data = signed.json()["data"]
    assert data["NextAction"]["errorType"] is None, data["NextAction"]
    assert data["onChainState"] == "RefundRequested"
    assert data["refundRequestedAt"] == unsigned.json()["data"]["refundRequestedAt"]  # the request's own time
    again = parties.buyer_api.post("/purchase/request-refund", body)  # unsigned again: the signature stays
    assert again.status_code == 200 and again.json()["data"]["NextAction"]["errorType"] is None


def test_the_funds_of_a_purchase_whose_service_was_withdrawn_are_not_locked(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """A purchase is accepted at once on the seller's behalf (a listed service is a standing offer). The seller
    deregistering the service, or being deactivated, before the buyer locked the funds did not withdraw it:
    lock-funds was 202, the buyer's money locked and the job started at a service that was gone, the buyer paid back
    by reclaim after the contract's grace at best."""
    for withdraw, code in [(lambda: parties.seller_api.delete(f"/agents/services/{parties.service.pk}"),
                            "service_deregistered"),
                           (lambda: type(parties.seller).objects.filter(pk=parties.seller.pk).update(
                               is_active=False), "seller_deactivated")]:
        if code == "seller_deactivated":
            parties.service.__class__.objects.filter(pk=parties.service.pk).update(state="registered")
        created = parties.buyer_api.post("/purchase", {
            "network": "Preprod", "agentIdentifier": str(parties.service.pk), "input_data": INPUT})
        assert created.status_code == 200, created.content
        purchase = created.json()["data"]
        withdraw()
        body = {"network": "Preprod", "blockchainIdentifier": purchase["blockchainIdentifier"]}
        refund = sign_typed_data(parties.buyer_account.key, purchase["refundRequestTypedData"])
        signed = parties.signed_purchase(purchase)
        with django_capture_on_commit_callbacks(execute=True):
            refused = parties.buyer_api.post("/purchase/lock-funds", {**body, **signed, "refundSignature": refund})
            generic = parties.buyer_api.post(f"/usage-agreements/{purchase['agreementId']}/activate-escrow", signed)
        assert refused.status_code == 409 and error_code(refused) == code, refused.content
        assert generic.status_code == 409 and error_code(generic) == code, generic.content
        assert MasumiPurchase.objects.get(pk=purchase["id"]).refund_signature == ""  # nothing kept
        after = parties.buyer_api.get(f"/purchase/{purchase['id']}").json()["data"]
        assert after["CurrentTransaction"] is None and after["onChainState"] is None
        assert after["NextAction"]["requestedAction"] == "FundsLockingRequested"


def test_unlock_time_leaves_the_buyer_time_to_dispute_a_result_submitted_at_submit_result_time(
        parties, escrow_chain, settings):
    """A result is accepted until submitResultTime and disputed until unlockTime (a challenge that must stay valid
    CHALLENGE_SIGNATURE_MIN_VALIDITY_SECONDS to be mined). A purchase, or a seller's payment request that the masumi
    library's buyer copies, with unlockTime a second after submitResultTime was accepted: a result submitted at the
    last moment could not be disputed at all, and the seller was paid for it whatever it was."""
    pay_by = deadline_clock(escrow_chain) + 600
    submit = pay_by + 3600
    gap = settings.MASUMI_MIN_DISPUTE_SECONDS
    assert gap >= settings.CHALLENGE_SIGNATURE_MIN_VALIDITY
    body = {"agentIdentifier": str(parties.service.pk), "network": "Preprod", "identifierFromPurchaser": "order-9",
            "payByTime": iso(pay_by), "submitResultTime": iso(submit)}
    for api, path, extra in [(parties.seller_api, "/payment/", {}),
                             (parties.buyer_api, "/purchase/", {"input_data": INPUT})]:
        for unlock in (submit + 1, submit + gap - 1):
            short = api.post(path, {**body, **extra, "unlockTime": iso(unlock)})
            assert short.status_code == 400 and error_code(short) == "invalid_timers", (path, short.content)
            assert short.json()["error"]["details"] == {"timer": "unlock_time", "min_seconds_after_submit_result_time":
                                                        gap}
        enough = api.post(path, {**body, **extra, "unlockTime": iso(submit + gap)})
        assert enough.status_code == 200, (path, enough.content)


def test_lock_funds_again_once_the_funds_are_locked_is_a_conflict_naming_the_state(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """A buyer retrying lock-funds after the funds were locked (a lost answer, no Idempotency-Key) was told 400
    wrong_permit_nonce (the permit it signed was spent by the activation), which sends it to sign a new permit for
    an escrow that is funded already."""
    purchase, body = locked_purchase(parties, django_capture_on_commit_callbacks)
    # The package signed again as it was (its permit's nonce spent since: read from the token, the SDK refuses it).
    spent = purchase["ActivationPackage"]["escrow_permit"]["message"]["nonce"]
    again = parties.buyer_api.post("/purchase/lock-funds",
                                   {**body, **parties.signed_purchase(purchase, permit_nonce=spent)})
    assert again.status_code == 409 and error_code(again) == "invalid_transition", again.content
    assert again.json()["error"]["details"]["status"] == "active"


class WorkerKilled(BaseException):
    """The web worker killed (a deploy, its memory limit) right after the activation's transaction committed."""


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_refund_signature_given_at_lock_funds_is_kept_with_the_activation_whatever_kills_the_worker_after(
        parties, escrow_chain, monkeypatch):
    """lock-funds queued the activation (its own transaction), then saved the buyer's refundSignature in another
    statement: a worker killed in between had the funds locked and the signature lost, and the retry is 409
    activation_in_progress, so the buyer's later unsigned request-refund (the masumi library's) was paid back by
    reclaim after the contract's grace, not by the purchase's timers, and a result was not disputed."""
    from escrow import tasks
    from escrow.models import ChainTransaction, TxPurpose

    created = parties.buyer_api.post("/purchase", {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                                  "input_data": INPUT})
    assert created.status_code == 200, created.content
    purchase = created.json()["data"]
    body = {"network": "Preprod", "blockchainIdentifier": purchase["blockchainIdentifier"],
            **parties.signed_purchase(purchase),
            "refundSignature": sign_typed_data(parties.buyer_account.key, purchase["refundRequestTypedData"])}

    def killed(*args, **kwargs):  # the first thing run once the activation's transaction committed
        raise WorkerKilled

    monkeypatch.setattr(tasks.submit_transaction, "delay", killed)
    with pytest.raises(WorkerKilled):
        parties.buyer_api.post("/purchase/lock-funds", body)
    monkeypatch.undo()
    assert ChainTransaction.objects.filter(agreement_id=purchase["agreementId"], purpose=TxPurpose.ACTIVATE).exists()
    assert MasumiPurchase.objects.get(pk=purchase["id"]).refund_signature == body["refundSignature"]
    retried = parties.buyer_api.post("/purchase/lock-funds", body)
    assert retried.status_code == 409 and error_code(retried) == "activation_in_progress", retried.content
    assert retried.json()["error"]["details"]["status"] == "submitting"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)  # the two submissions run on connections of their own
def test_two_different_result_hashes_submitted_at_once_one_is_committed_and_the_other_refused(
        parties, escrow_chain, monkeypatch, django_capture_on_commit_callbacks):
    """The seller's submit-result read the purchase without a lock, then recorded the hash under it: a second hash
    submitted while the first was being recorded was answered 200 (the first hash in its answer, the second dropped),
    where one submitted after it is 409 result_already_submitted."""
    import threading

    from django.db import connection

    from escrow import purchases

    purchase, body = locked_purchase(parties, django_capture_on_commit_callbacks)
    both_read = threading.Barrier(2, timeout=10)
    record = purchases.purchase_result_record

    def record_once_both_read(**kwargs):
        both_read.wait()
        return record(**kwargs)

    monkeypatch.setattr(purchases, "purchase_result_record", record_once_both_read)
    answers = {}

    def submit(result_hash):
        try:
            answers[result_hash] = parties.seller_api.post("/payment/submit-result", {
                **body, "submitResultHash": result_hash})
        finally:
            connection.close()

    threads = [threading.Thread(target=submit, args=(result_hash,)) for result_hash in ("c" * 64, "d" * 64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    committed = MasumiPurchase.objects.get(pk=purchase["id"]).result_hash
    assert committed in answers
    assert answers[committed].status_code == 200, answers[committed].content
    [other] = [answer for result_hash, answer in answers.items() if result_hash != committed]
    assert other.status_code == 409 and error_code(other) == "result_already_submitted", other.content


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)  # the two authorizations run on connections of their own
def test_a_sellers_refund_authorization_sent_twice_at_once_or_retried_once_done_is_answered_as_the_first(
        parties, escrow_chain, monkeypatch, django_capture_on_commit_callbacks):
    """The seller's authorize-refund of a disputed payment: a second one at once was 409 resolution_in_progress, and
    a retry once the refund was resolved (its answer lost) 409 no_refund_requested ("only a disputed payment is
    refunded"), for a refund it had authorized."""
    import threading

    from django.db import connection

    from escrow import settlement
    from escrow.models import ChainTransaction, TxPurpose

    capture = django_capture_on_commit_callbacks
    purchase, body = locked_purchase(parties, capture)
    with capture(execute=True):
        submitted = parties.seller_api.post("/payment/submit-result", {**body, "submitResultHash": "c" * 64})
    assert submitted.status_code == 200, submitted.content
    confirm_all(capture)
    with capture(execute=True):
        disputed = parties.buyer_api.patch("/purchase", {**body, "signature": sign_typed_data(
            parties.buyer_account.key, purchase["refundRequestTypedData"])})
    assert disputed.status_code == 200, disputed.content
    confirm_all(capture)
    assert parties.buyer_api.get(f"/purchase/{purchase['id']}").json()["data"]["onChainState"] == "Disputed"

    both_read = threading.Barrier(2, timeout=10)
    resolve = settlement.settlement_resolve

    def resolve_once_both_read(**kwargs):  # both found no resolution under way
        both_read.wait()
        return resolve(**kwargs)

    monkeypatch.setattr(settlement, "settlement_resolve", resolve_once_both_read)
    answers = []

    def authorize():
        try:
            answers.append(parties.seller_api.post("/payment/authorize-refund", body))
        finally:
            connection.close()

    threads = [threading.Thread(target=authorize) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.undo()
    assert [answer.status_code for answer in answers] == [200, 200], [answer.content for answer in answers]
    confirm_all(capture)
    retried = parties.seller_api.post("/payment/authorize-refund/", body)
    assert retried.status_code == 200, retried.content
    assert retried.json()["data"]["onChainState"] in ("Disputed", "DisputedWithdrawn")
    assert ChainTransaction.objects.filter(agreement_id=purchase["agreementId"], purpose=TxPurpose.RESOLVE).count() == 1


def test_a_sellers_refund_authorization_while_an_operators_split_resolution_is_under_way_is_refused(
        parties, escrow_chain, django_capture_on_commit_callbacks):
    """The arbiter decided part to the seller before the seller's authorize-refund arrived: the call was answered
    200, as if the refund it asked for were made, while the split was paid."""
    from escrow import settlement
    from agreements.models import UsageAgreement

    capture = django_capture_on_commit_callbacks
    purchase, body = locked_purchase(parties, capture)
    with capture(execute=True):
        assert parties.seller_api.post("/payment/submit-result", {**body, "submitResultHash": "c" * 64}
                                       ).status_code == 200
    confirm_all(capture)
    with capture(execute=True):
        assert parties.buyer_api.patch("/purchase", {**body, "signature": sign_typed_data(
            parties.buyer_account.key, purchase["refundRequestTypedData"])}).status_code == 200
    confirm_all(capture)
    agreement = UsageAgreement.objects.get(pk=purchase["agreementId"])
    with capture(execute=False):
        settlement.settlement_resolve(agreement=agreement, seller_amount=agreement.deposit_amount // 2, operator=None)

    refused = parties.seller_api.post("/payment/authorize-refund", body)
    assert refused.status_code == 409 and error_code(refused) == "resolution_in_progress", refused.content



@pytest.mark.parametrize("deactivated", ["seller", "its owner"])
def test_a_deactivated_sellers_masumi_service_has_no_payment_information(parties, deactivated):
    """The catalog (REST and registry) hides a service whose seller, or the seller's owner, is deactivated (404
    `service_not_found`); the Masumi connect seed's payment information still answered for it, with its upstream
    and the seller's wallet, as a service to buy (its purchase now 404 as well)."""
    if deactivated == "seller":
        parties.seller.is_active = False
        parties.seller.save()
    else:
        parties.seller.owner.is_active = False
        parties.seller.owner.save()
    service_id = str(parties.service.pk)
    assert error_code(parties.buyer_api.get(f"/agents/services/{service_id}")) == "service_not_found"
    info = parties.buyer_api.get("/payment-information", {"agentIdentifier": service_id})
    assert info.status_code == 404 and error_code(info) == "service_not_found", info.content
    bought = parties.buyer_api.post("/purchase", {"network": "Preprod", "agentIdentifier": service_id,
                                                  "input_data": INPUT})
    assert bought.status_code == 404 and error_code(bought) == "service_not_found", bought.content
    assert not MasumiPurchase.objects.exists()



def test_a_pay_by_time_too_far_ahead_is_refused_naming_pay_by_time(parties, escrow_chain):
    """A payByTime more than 30 days ahead, the later timers left to their defaults, was refused naming unlockTime
    (`details.timer: unlock_time`, "unlockTime may be at most 30 days ahead"), a timer the caller never sent."""
    far = deadline_clock(escrow_chain) + 31 * 24 * 3600
    for path, api, body in [("/purchase", parties.buyer_api, {"input_data": INPUT}),
                            ("/payment", parties.seller_api, {"identifierFromPurchaser": "order-9"})]:
        refused = api.post(path, {"network": "Preprod", "agentIdentifier": str(parties.service.pk), **body,
                                  "payByTime": str(far * 1000)})
        assert refused.status_code == 400 and error_code(refused) == "invalid_timers", (path, refused.content)
        error = refused.json()["error"]
        assert error["details"]["timer"] == "pay_by_time", (path, error)
        assert error["message"].startswith("payByTime"), (path, error)


def test_a_purchase_the_buyers_owner_must_approve_is_refused_naming_the_rule(parties):
    """A Masumi purchase is paid at once, so one the owner's policy must approve is refused: 403
    `approval_required`, without the `details.rule` every other policy refusal carries."""
    owner_api = Api(issue_owner_token(parties.buyer.owner))
    assert owner_api.put(f"/agents/{parties.buyer.pk}/policies",
                         {"approval_threshold_atomic": 1}).status_code == 200
    refused = parties.buyer_api.post("/purchase", {"network": "Preprod", "agentIdentifier": str(parties.service.pk),
                                                   "input_data": INPUT})
    assert refused.status_code == 403 and error_code(refused) == "approval_required", refused.content
    assert refused.json()["error"]["details"].get("rule"), refused.content
    assert not MasumiPurchase.objects.exists()


def test_invalid_timers_name_the_chain_time_in_milliseconds_as_the_timers_are(parties, escrow_chain):
    """The API's timers are strings of Unix milliseconds; a timer in the past was refused with `chain_time` in
    seconds, a thousand times earlier than any timer the caller could compare it with."""
    now = deadline_clock(escrow_chain)
    for path, api, body in [("/purchase", parties.buyer_api, {"input_data": INPUT}),
                            ("/payment", parties.seller_api, {"identifierFromPurchaser": "order-9"})]:
        refused = api.post(path, {"network": "Preprod", "agentIdentifier": str(parties.service.pk), **body,
                                  "payByTime": str((now - 60) * 1000)})
        assert refused.status_code == 400 and error_code(refused) == "invalid_timers", (path, refused.content)
        chain_time = refused.json()["error"]["details"]["chain_time"]
        assert chain_time.isdigit() and abs(int(chain_time) - now * 1000) <= 60_000, (path, chain_time)


@pytest.mark.parametrize("identifier", [" order-9", "order-9 ", "\torder-9\n"], ids=["leading", "trailing", "both"])
def test_an_identifier_from_purchaser_with_spaces_is_kept_as_the_buyer_hashed_it(parties, identifier):
    """identifierFromPurchaser was trimmed before the input hash was checked: the buyer's own MIP-004 hash of
    `identifier;JCS(input)` then answered 400 `input_hash_mismatch`."""
    from escrow import purchases

    bought = parties.buyer_api.post("/purchase", {
        "network": "Preprod", "agentIdentifier": str(parties.service.pk), "input_data": INPUT,
        "identifierFromPurchaser": identifier, "inputHash": purchases.input_hash_of(INPUT, identifier)})
    assert bought.status_code == 200, bought.content
    assert bought.json()["data"]["identifierFromPurchaser"] == identifier
    requested = parties.seller_api.post("/payment", {
        "network": "Preprod", "agentIdentifier": str(parties.service.pk), "identifierFromPurchaser": identifier})
    assert requested.status_code == 200, requested.content
    assert requested.json()["data"]["identifierFromPurchaser"] == identifier


def test_a_seller_keeps_at_most_its_bound_of_unpaid_payment_requests(parties, escrow_chain, settings):
    """A payment request costs its seller nothing and was kept for ever, paid or not: a seller (any of its pay keys)
    requesting payments in a loop, bounded only by the API's rate limit (6,000 a minute), wrote ~1.3 kB a row
    without bound, and each `GET /payment` sorted all of them. At most MASUMI_UNPAID_PAYMENT_REQUESTS_PER_SELLER are
    unpaid and either still payable or requested in the last day; beyond, 409 `payment_requests_limit_reached`,
    nothing written. A paid request no longer counts."""
    from escrow.models import MasumiPaymentRequest

    settings.MASUMI_UNPAID_PAYMENT_REQUESTS_PER_SELLER = 3
    pay_by = deadline_clock(escrow_chain) + 600
    payments = [payment_request(parties, pay_by, identifierFromPurchaser=f"order-{n}") for n in range(3)]
    body = {"agentIdentifier": str(parties.service.pk), "network": "Preprod", "identifierFromPurchaser": "order-x",
            "payByTime": iso(pay_by), "submitResultTime": iso(pay_by + 3600)}
    refused = parties.seller_api.post("/payment/", body)
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "payment_requests_limit_reached"
    assert refused.json()["error"]["details"]["max_unpaid_payment_requests"] == 3
    assert MasumiPaymentRequest.objects.filter(service__seller=parties.seller).count() == 3

    paid = parties.buyer_api.post("/purchase/", paying_body(parties, payments[0], identifierFromPurchaser="order-0"))
    assert paid.status_code == 200, paid.content
    assert parties.seller_api.post("/payment/", body).status_code == 200  # the paid one no longer counts


def test_an_unpaid_payment_request_is_deleted_a_retention_after_its_pay_by_time_and_a_paid_one_is_kept(
        parties, escrow_chain, settings):
    """An unpaid payment request was kept for ever: its bound counts only those still payable or made in the last
    day, so a seller requesting its bound's worth each day grew the table (~1.3 kB a row) without end, though one
    past its payByTime can never be paid. The `purge-expired-payment-requests` beat task deletes the unpaid ones
    MASUMI_PAYMENT_REQUEST_KEEP_DAYS after their payByTime; a paid one (money history) and one within the retention
    are kept. A run deletes a bounded number of rows; the next goes on. Safe twice."""
    from escrow import tasks
    from escrow.models import MasumiPaymentRequest

    settings.MASUMI_PAYMENT_REQUEST_KEEP_DAYS = 7
    entry = next(entry for entry in settings.CELERY_BEAT_SCHEDULE.values()
                 if entry["task"] == "escrow.tasks.purge_expired_payment_requests")
    assert entry["schedule"] <= timedelta(days=1)
    pay_by = deadline_clock(escrow_chain) + 600
    paid, expired, stale, recent = (payment_request(parties, pay_by, identifierFromPurchaser=f"order-{n}")
                                    for n in range(4))
    bought = parties.buyer_api.post("/purchase/", paying_body(parties, paid, identifierFromPurchaser="order-0"))
    assert bought.status_code == 200, bought.content

    def pay_by_days_ago(payment: dict, days: float) -> None:
        MasumiPaymentRequest.objects.filter(pk=payment["id"]).update(
            pay_by_time=timezone.now() - timedelta(days=days))

    pay_by_days_ago(paid, 8)
    pay_by_days_ago(expired, 8)
    pay_by_days_ago(stale, 9)
    pay_by_days_ago(recent, 6)
    settings.RETENTION_PURGE_BATCH = settings.RETENTION_PURGE_BATCHES_PER_RUN = 1
    assert tasks.purge_expired_payment_requests() == 1
    assert tasks.purge_expired_payment_requests() == 1
    assert set(map(str, MasumiPaymentRequest.objects.values_list("pk", flat=True))) == {paid["id"], recent["id"]}
    gone = parties.seller_api.post("/payment/resolve-blockchain-identifier/", {
        "blockchainIdentifier": expired["blockchainIdentifier"], "network": "Preprod"})
    assert (gone.status_code, error_code(gone)) == (404, "payment_not_found")
    assert MasumiPurchase.objects.get(payment_request_id=paid["id"])
    assert tasks.purge_expired_payment_requests() == 0  # safe twice


def test_a_sellers_payments_are_listed_page_by_page_as_a_masumi_node_lists_them(parties, escrow_chain):
    """`GET /payment` took neither `cursorId` nor `includeHistory`, which a Masumi node's clients send (`limit=100&
    includeHistory=true`, then the last payment's id as `cursorId`): 400 `unknown_field`, and a seller with more
    payments than a page had no way to list the older ones. The paid ones come first, then the unpaid requests, each
    newest first; a page goes on after the payment its cursorId names. `GET /purchase` takes `includeHistory` too."""
    pay_by = deadline_clock(escrow_chain) + 600
    requests = [payment_request(parties, pay_by, identifierFromPurchaser=f"order-{n}") for n in range(3)]
    bought = parties.buyer_api.post("/purchase/", paying_body(parties, requests[0], identifierFromPurchaser="order-0"))
    assert bought.status_code == 200, bought.content
    listed, cursor = [], {}
    for _ in range(4):
        page = parties.seller_api.get("/payment/", {"network": "Preprod", "limit": "1", "includeHistory": "true",
                                                    **cursor})
        assert page.status_code == 200, page.content
        payments = page.json()["data"]["Payments"]
        if not payments:
            break
        listed += [payment["id"] for payment in payments]
        cursor = {"cursorId": payments[-1]["id"]}
    assert listed == [bought.json()["data"]["id"], requests[2]["id"], requests[1]["id"]]
    unknown = parties.seller_api.get("/payment/", {"network": "Preprod",
                                                   "cursorId": bought.json()["data"]["agreementId"]})
    assert unknown.status_code == 404 and error_code(unknown) == "payment_not_found", unknown.content
    theirs = parties.buyer_api.get("/purchase/", {"network": "Preprod", "includeHistory": "true"})
    assert [purchase["id"] for purchase in theirs.json()["data"]["Purchases"]] == [bought.json()["data"]["id"]]


def test_a_sellers_view_of_a_paid_payment_shows_its_own_metadata_never_the_buyers(parties, escrow_chain):
    """Each party's `metadata` is its private note (the masumi library: "Private metadata to be stored with the
    payment request"; a purchase's, the buyer's). Once a buyer paid the seller's request, the seller's view of the
    payment (`GET /payment`, resolve-blockchain-identifier) showed the buyer's metadata in place of its own."""
    pay_by = deadline_clock(escrow_chain) + 600
    payment = payment_request(parties, pay_by, metadata="seller's own note")
    bought = parties.buyer_api.post("/purchase/", paying_body(parties, payment, metadata="buyer's private note"))
    assert bought.status_code == 200 and bought.json()["data"]["metadata"] == "buyer's private note", bought.content
    resolved = parties.seller_api.post("/payment/resolve-blockchain-identifier", {
        "network": "Preprod", "blockchainIdentifier": payment["blockchainIdentifier"]})
    [listed] = parties.seller_api.get("/payment/", {"network": "Preprod"}).json()["data"]["Payments"]
    assert resolved.json()["data"]["metadata"] == listed["metadata"] == "seller's own note", resolved.content
