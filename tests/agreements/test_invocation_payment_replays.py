"""A skill's paid result is the payer's: what anyone can rebuild from the chain does not read it."""

import pytest
from x402 import PaymentPayload
from x402.http import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload

from escrow.models import ChainTransaction
from sdk.x402_signing import RETRY_PROOF_HEADER, sign_retry_proof
from tests.agreements.test_invocations import Market, _from_client
from tests.catalog.factories import AgentFactory, issue_key
from tests.conftest import Api

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


@pytest.fixture
def market(escrow_chain, http_server):
    return Market(escrow_chain, http_server)


def rebuilt_from_the_chain(market, skill: str = "translate") -> str:
    """An x402 payment header built by an onlooker from the invocation payment's calldata (transferWithAuthorization's
    arguments are the signed authorization, its v, r, s the signature) and the skill's public 402."""
    mined = ChainTransaction.objects.get(purpose="invocation_payment").mined_tx_hash
    calldata = market.chain.w3.eth.get_transaction(mined)["input"]
    _, args = market.chain.usdc.decode_function_input(calldata)
    signature = "0x" + bytes(args["r"]).hex() + bytes(args["s"]).hex() + f"{args['v']:02x}"
    required = decode_payment_required_header(Api().post(f"/agents/sol/{skill}", {"input": {}})["PAYMENT-REQUIRED"])
    authorization = ExactEIP3009Authorization(
        from_address=args["from"], to=args["to"], value=str(args["value"]), valid_after=str(args["validAfter"]),
        valid_before=str(args["validBefore"]), nonce="0x" + bytes(args["nonce"]).hex())
    return encode_payment_signature_header(PaymentPayload(
        payload=ExactEIP3009Payload(authorization, signature).to_dict(), accepted=required.accepts[0],
        resource=required.resource))


@pytest.mark.parametrize("onlooker, text, proof_by", [
    ("anonymous", "anything", None),  # the input is the payer's: unknown to whoever reads the chain
    ("an_agent", "my secret letter", None),  # the input guessed, with another agent's key
    # the input guessed, anonymously from the payer's network (a shared NAT, proxy or forwarded address)
    ("anonymous", "my secret letter", None),
    ("anonymous", "my secret letter", "buyer2"),  # ... with a retry proof signed by the onlooker's own wallet
])
def test_a_payment_rebuilt_from_the_chain_does_not_name_the_invocation_it_bought(
        market, onlooker, text, proof_by, django_capture_on_commit_callbacks):
    """The payment's transaction shows the whole signed authorization: replayed by anyone within its window, the
    402 `authorization_already_used` named the invocation, whose result `GET /services/{id}` shows to
    whoever holds its id: a paid result for free. Anonymously it was named to any caller from the payer's network
    (the same input guessed): only the payer's retry proof names it."""
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    with django_capture_on_commit_callbacks(execute=True):
        paid = market.caller.post("/agents/sol/translate", {"input": {"text": "my secret letter"}},
                                  headers={"X-PAYMENT": market.pay("translate")})
    assert paid.status_code == 200, paid.content

    caller = Api(issue_key(AgentFactory(handle="eve"))) if onlooker == "an_agent" else Api()
    rebuilt = rebuilt_from_the_chain(market)
    headers = {"X-PAYMENT": rebuilt}
    if proof_by:
        headers[RETRY_PROOF_HEADER] = sign_retry_proof(rebuilt, getattr(market.chain.accounts, proof_by).key)
    replay = caller.post("/agents/sol/translate", {"input": {"text": text}}, headers=headers)

    assert (replay.status_code, replay.json()["error"]) == (402, "authorization_already_used"), replay.content
    assert "invocation_id" not in replay.json()["details"]
    assert len(market.upstream.requests) == 1


@pytest.mark.parametrize("network, proof_spelling", [("the_payers", "0x"), ("another", "0x"),
                                                    ("the_payers", "bare_hex")])
def test_the_payers_own_retry_of_the_same_call_still_learns_its_invocation(
        market, network, proof_spelling, django_capture_on_commit_callbacks):
    """An anonymous payer proves the retry its own with its wallet's signature (the SDK's `sign_retry_proof`, or
    its hex without 0x), from whichever network its retry comes."""
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    with django_capture_on_commit_callbacks(execute=True):
        first = market.call("translate", payment, header="X-PAYMENT")

    api = _from_client("198.51.100.7") if network == "another" else Api()
    proof = sign_retry_proof(payment, market.buyer.key)
    retry = api.post("/agents/sol/translate", {"input": {"text": "hello"}}, headers={
        "X-PAYMENT": payment, RETRY_PROOF_HEADER: proof if proof_spelling == "0x" else proof.removeprefix("0x")})

    assert (retry.status_code, retry.json()["error"]) == (402, "authorization_already_used")
    assert retry.json()["details"]["invocation_id"] == first.json()["invocation_id"]


@pytest.mark.parametrize("proof", [
    "0x" + "00" * 65,  # r = s = 0: no public key recovers from it
    "0x" + "ff" * 65,  # r and s past the curve's order
    "0x" + "ab" * 20_000,  # a huge proof
    "0x١٢",  # not hex
], ids=["zero", "past_the_curve_order", "huge", "unicode_digits"])
def test_a_hostile_retry_proof_is_no_retry_and_no_500(market, proof, django_capture_on_commit_callbacks):
    """A replay of the payment (its transaction shows it) with a retry proof no key made: eth-keys raised
    BadSignature out of the recovery, a 500."""
    market.upstream.responses.append((200, {"translation": "bonjour"}))
    payment = market.pay("translate")
    with django_capture_on_commit_callbacks(execute=True):
        assert market.call("translate", payment, header="X-PAYMENT").status_code == 200

    replay = market.caller.post("/agents/sol/translate", {"input": {"text": "hello"}},
                                headers={"X-PAYMENT": payment, RETRY_PROOF_HEADER: proof})

    assert (replay.status_code, replay.json()["error"]) == (402, "authorization_already_used"), replay.content
    assert "invocation_id" not in replay.json()["details"]
    assert len(market.upstream.requests) == 1
