"""A skill's x402 payment when the marketplace's answer to the paid call is lost (a timeout, a dropped connection
after the marketplace took the payment): a retry of the same call re-sends the authorization signed for it, never a
second one the marketplace could settle as well. Without a chain: the marketplace is an httpx `MockTransport`."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from x402.http import decode_payment_signature_header

from sdk import AnswerMismatch, MarketplaceClient, MarketplaceError
from tests.sdk.test_signing_bounds import KEY, NETWORK, payment_required

INVOCATION_ID = "inv_1"
PAID = {"amount": "0.02", "amount_atomic": 20000}  # the 402's amount (tests.sdk.test_signing_bounds.payment_required)
COMPLETED = {"invocation_id": INVOCATION_ID, "agent": "seller", "skill": "translate", "status": "completed",
             "result": {"translation": "bonjour"}, "payment": PAID}


class SkillMarketplace:
    """A skill's 402 for an unpaid call; a paid call's answer lost (`httpx.ReadTimeout`) the first `dropped` times,
    the marketplace having taken the payment; a payment it took answered, as the marketplace does, 402
    `authorization_already_used` naming the invocation it bought. `paid_answer` overrides the first paid answer."""

    def __init__(self, dropped: int = 1, paid_answer: httpx.Response | None = None,
                 invocation: dict[str, Any] = COMPLETED):
        self.dropped = dropped
        self.paid_answer = paid_answer
        self.invocation = invocation
        self.payments: list[str] = []  # every X-PAYMENT header received

    def nonces(self) -> set[str]:
        return {decode_payment_signature_header(header).payload["authorization"]["nonce"]
                for header in self.payments}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == f"/services/{INVOCATION_ID}":
            return httpx.Response(200, json=self.invocation)
        payment = request.headers.get("X-PAYMENT")
        if payment is None:
            return httpx.Response(402, headers={"PAYMENT-REQUIRED": payment_required()},
                                  json={"error": "payment_required"})
        taken = payment in self.payments
        self.payments.append(payment)
        if not taken and self.paid_answer is not None:
            return self.paid_answer
        if self.dropped:
            self.dropped -= 1
            raise httpx.ReadTimeout("the answer was lost", request=request)
        if taken:
            return httpx.Response(402, json={"error": "authorization_already_used", "message": "executed once",
                                             "details": {"invocation_id": INVOCATION_ID}})
        return httpx.Response(200, json={"invocation_id": INVOCATION_ID, "result": {"translation": "bonjour"},
                                         "payment": PAID})


def invoke(marketplace: SkillMarketplace, **options: Any) -> dict[str, Any]:
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, retry_backoff=0.01,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        return buyer.invoke_skill("seller", "translate", {"text": "hello"}, private_key=KEY,
                                  max_amount_atomic=10**6, **options)


def test_a_paid_call_whose_answer_is_lost_is_retried_with_the_same_authorization():
    """The paid POST was sent once: its answer lost, the call raised ReadTimeout, and the caller's retry signed a
    second authorization (another nonce) that a compromised or merely buggy marketplace could settle besides the
    first. The SDK re-sends the same header and learns the invocation the payment bought."""
    marketplace = SkillMarketplace(dropped=1)

    answer = invoke(marketplace)

    assert answer == COMPLETED
    assert len(marketplace.payments) == 2 and len(marketplace.nonces()) == 1


def test_a_repeat_under_the_same_idempotency_key_re_sends_the_authorization_signed_then():
    """Every answer lost past the SDK's own retries: the caller's repeat of the call under its idempotency key sends
    the authorization signed the first time, signing nothing new."""
    marketplace = SkillMarketplace(dropped=3)
    with MarketplaceClient("https://marketplace.example", "mk_test", network=NETWORK, retry_backoff=0.01,
                           transport=httpx.MockTransport(marketplace)) as buyer:
        def call(text: str = "hello", **options: Any) -> dict[str, Any]:
            return buyer.invoke_skill("seller", "translate", {"text": text}, private_key=KEY,
                                      max_amount_atomic=10**6, idempotency_key="translate-1", **options)

        with pytest.raises(httpx.ReadTimeout):
            call()
        assert call() == COMPLETED
        with pytest.raises(ValueError, match="translate-1"):  # the key names that call, not another
            call("goodbye")
        with pytest.raises(ValueError, match="translate-1"):
            buyer.invoke_skill("seller", "translate", {"text": "hello"}, private_key=KEY, max_amount_atomic=1,
                               idempotency_key="translate-1")

    assert len(marketplace.payments) == 4 and len(marketplace.nonces()) == 1


@pytest.mark.parametrize("paid_answer", [
    httpx.Response(402, headers={"PAYMENT-REQUIRED": payment_required()}, json={"error": "payment_required"}),
    httpx.Response(402, json={"error": "authorization_already_used", "message": "executed once"}),
], ids=["payment required again", "already used, no invocation"])
def test_a_402_to_the_paid_call_raises_without_signing_again(paid_answer):
    marketplace = SkillMarketplace(dropped=0, paid_answer=paid_answer)

    with pytest.raises(MarketplaceError) as refusal:
        invoke(marketplace)

    assert refusal.value.status == 402
    assert len(marketplace.payments) == 1 and len(marketplace.nonces()) == 1


def test_an_unlost_paid_answer_is_returned_as_before():
    marketplace = SkillMarketplace(dropped=0)

    answer = invoke(marketplace, idempotency_key="translate-2")

    assert answer["result"] == {"translation": "bonjour"}
    assert len(marketplace.payments) == 1


@pytest.mark.parametrize(("field", "named"), [
    ("invocation_id", {**COMPLETED, "invocation_id": "inv_2"}),
    ("skill", {**COMPLETED, "skill": "summarize"}),
    ("agent", {**COMPLETED, "agent": "another-seller"}),
    ("payment.amount_atomic", {**COMPLETED, "payment": {**PAID, "amount_atomic": 1}}),
], ids=["another invocation", "another skill", "another seller", "another amount"])
@pytest.mark.parametrize("dropped", [1, 0], ids=["already used names it", "async answer names it"])
def test_an_invocation_of_another_call_than_the_one_paid_is_not_returned(field, named, dropped):
    """The invocation the marketplace names after the payment (a lost answer's retry answered 402
    `authorization_already_used` with its id, or an async call's id awaited) was returned as it came: a compromised
    marketplace had the buyer take the result of another seller's or skill's call, or of a cheaper one, for the
    call it paid."""
    paid_answer = None if dropped else httpx.Response(202, json={"invocation_id": INVOCATION_ID, "status": "pending"})
    marketplace = SkillMarketplace(dropped=dropped, paid_answer=paid_answer, invocation=named)

    with pytest.raises(AnswerMismatch) as refusal:
        invoke(marketplace)

    assert refusal.value.field == f"invocation.{field}"
    assert len(marketplace.nonces()) == 1


def test_a_sync_answer_for_another_amount_than_paid_is_not_returned():
    marketplace = SkillMarketplace(dropped=0, paid_answer=httpx.Response(200, json={
        "invocation_id": INVOCATION_ID, "result": {"translation": "bonjour"}, "payment": {**PAID, "amount_atomic": 1}}))

    with pytest.raises(AnswerMismatch) as refusal:
        invoke(marketplace)

    assert refusal.value.field == "skill answer.payment.amount_atomic"
