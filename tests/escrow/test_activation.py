"""Escrow activation through the API against the real contracts on Anvil."""

from collections import Counter
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from agreements.models import AgreementEvent, UsageAgreement
from escrow.models import ChainTransaction, TxStatus
from tests.chain_fixtures import TOKEN_NAMES
from tests.conftest import codes_at, error_code
from tests.escrow.flow import (USDC, Parties, confirm_all, fund, mined_what_was_sent, network_of, pay_fees,
                               usdc_balance)
from tests.support.rpc_relay import RpcRelay, node_block_times

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


@pytest.fixture
def parties(escrow_chain):
    return Parties(escrow_chain)  # 0.02 USDC per call


@pytest.mark.parametrize("chain", TOKEN_NAMES, indirect=True)  # "USDC": Base Sepolia's name
def test_proposal_to_active_moves_usdc_on_chain(parties, escrow_chain, django_capture_on_commit_callbacks):
    chain = escrow_chain
    agreement = parties.accepted_agreement(quantity=100)  # deposit 2 USDC, fee 0.10 USDC
    buyer, fee_recipient = parties.buyer_account.address, chain.accounts.fee_recipient.address
    before = usdc_balance(chain, buyer), usdc_balance(chain, fee_recipient)

    package = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package").json()
    assert package["intent"]["message"]["depositAmount"] == 2 * USDC
    # One permit covers the deposit and the fee (the contract's front-running-robust path).
    assert package["escrow_permit"]["message"]["value"] == 2 * USDC + 100_000 and "fee_permit" not in package

    response = parties.activate(agreement["id"], django_capture_on_commit_callbacks)
    assert response.status_code == 202, response.content
    assert response.json()["status"] == "submitting"

    after = parties.agreement(agreement["id"])
    assert after["status"] == "active"
    tx = ChainTransaction.objects.get(agreement_id=agreement["id"])
    assert tx.status == TxStatus.CONFIRMED
    assert usdc_balance(chain, buyer) == before[0] - 2 * USDC - 100_000
    assert usdc_balance(chain, fee_recipient) == before[1] + 100_000
    assert usdc_balance(chain, chain.addresses["escrow"]) == 2 * USDC

    status = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/escrow-status",
                                   {"verify": "true"}).json()
    assert status["deposited_atomic"] == 2 * USDC and status["remaining_atomic"] == 2 * USDC
    assert status["activation_tx_hash"] == tx.mined_tx_hash
    assert status["transactions"][0]["confirmations"] >= 1
    assert status["onchain"]["state"] == "active"
    assert int(status["onchain"]["depositAmount"]) == 2 * USDC
    assert status["onchain"]["buyer"] == buyer
    assert [e.to_status for e in AgreementEvent.objects.filter(agreement_id=agreement["id"])] == [
        "proposed", "accepted", "submitting", "active"]


def test_bad_signatures_are_refused_before_anything_is_queued(parties, escrow_chain):
    agreement = parties.accepted_agreement()
    url = f"/usage-agreements/{agreement['id']}/activate-escrow"
    stranger_signed = parties.signed_activation(agreement["id"])
    from sdk.typed_data import sign_typed_data

    package = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package").json()
    wrong = {"intent_signature": sign_typed_data(escrow_chain.accounts.stranger.key, package["intent"])}

    cases = [
        ({**stranger_signed, "intent_signature": wrong["intent_signature"]}, "wrong_signer"),
        ({**stranger_signed, "intent_signature": "0x" + "11" * 65}, "invalid_signature"),
        ({**stranger_signed, "deadline": stranger_signed["deadline"] + 1}, "wrong_signer"),  # not what was signed
        ({**stranger_signed, "deadline": 1}, "signature_expired"),
        ({**stranger_signed, "escrow_permit": {**stranger_signed["escrow_permit"], "nonce": 7}}, "wrong_permit_nonce"),
        ({**stranger_signed, "escrow_permit": {**stranger_signed["escrow_permit"], "value": 1}},
         "permit_value_too_low"),
        ({**stranger_signed, "fee_permit": stranger_signed["escrow_permit"]}, "validation_error"),  # one permit
    ]
    for body, code in cases:
        response = parties.buyer_api.post(url, body)
        assert response.status_code == 400, (code, response.content)
        assert error_code(response) == code
    assert "invalid" in codes_at(parties.buyer_api.post(url, {**stranger_signed, "intent_signature": "0x12"}),
                                 "intent_signature")
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "accepted"
    assert not ChainTransaction.objects.exists()



def test_an_escrow_permit_for_more_than_the_deposit_and_fee_is_refused(parties, escrow_chain):
    """The permit sets the escrow's allowance from the buyer's wallet: what activation leaves of one above the deposit
    plus the fee is a standing allowance anyone can spend by sending another intent the buyer signed (one whose
    activation reverted and is public, one of an agreement cancelled since: the escrow funded after its close, its
    fee kept) with no permit. The buyer grants the deposit plus the fee, exactly: more is 400 `permit_value_too_high`,
    nothing queued (as a direct purchase's fee permit)."""
    from sdk import typed_data

    agreement = parties.accepted_agreement()
    body = parties.signed_activation(agreement["id"])
    required = agreement["deposit_amount_atomic"] + agreement["infra_fee_atomic"]
    permit = body["escrow_permit"]
    domain = network_of(escrow_chain).token_domain
    typed = typed_data.erc2612_permit(
        chain_id=escrow_chain.chain_id, token_address=escrow_chain.addresses["usdc"],
        owner=parties.buyer_account.address, spender=escrow_chain.addresses["escrow"], value=required * 10,
        nonce=permit["nonce"], deadline=permit["deadline"], token_name=domain.name, token_version=domain.version)
    body["escrow_permit"] = {**permit, "value": required * 10,
                             "signature": typed_data.sign_typed_data(parties.buyer_account.key, typed)}

    response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)

    assert response.status_code == 400, response.content
    assert error_code(response) == "permit_value_too_high"
    assert response.json()["error"]["details"] == {"field": "escrow_permit", "required": required}
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "accepted"
    assert not ChainTransaction.objects.exists()


@pytest.mark.parametrize("field", ["deadline", "escrow_permit.deadline"])
def test_a_number_beyond_uint256_in_a_signed_activation_is_400_naming_the_field(parties, field):
    """The signed messages' numbers are uint256: one beyond was read as an integer and raised out of range while
    the message was built, a 500."""
    agreement = parties.accepted_agreement()
    body = parties.signed_activation(agreement["id"])
    outer, _, inner = field.rpartition(".")
    (body[outer] if outer else body)[inner] = 2**256

    response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)

    assert response.status_code == 400, response.content
    fields = response.json()["error"]["details"]["fields"]
    assert (fields[outer][inner] if outer else fields[inner])[0]["code"] == "max_value"
    assert UsageAgreement.objects.get(pk=agreement["id"]).status == "accepted"
    assert not ChainTransaction.objects.exists()

def test_unfunded_buyer_gets_402(escrow_chain):
    parties = Parties(escrow_chain, buyer_funds=0)
    agreement = parties.accepted_agreement()
    response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                      parties.signed_activation(agreement["id"]))
    assert response.status_code == 402 and error_code(response) == "insufficient_balance"


def test_a_buyer_funding_one_escrow_is_refused_a_second_while_the_first_activation_is_not_mined(
        escrow_chain, django_capture_on_commit_callbacks):
    """The balance covers one escrow: two activations posted at once each passed the balance check and the
    simulation alone, and the second reverted at the relayer's gas. What its activations not mined yet will take
    counts: the second is 402 insufficient_balance naming it (`committed`), nothing queued; once the first is mined,
    the balance says so itself."""
    parties = Parties(escrow_chain, buyer_funds=0)
    first, second = parties.accepted_agreement(), parties.accepted_agreement()
    required = first["deposit_amount_atomic"] + first["infra_fee_atomic"]
    fund(escrow_chain, parties.buyer_account.address, required + required // 2)
    with django_capture_on_commit_callbacks(execute=False) as submit:
        queued = parties.buyer_api.post(f"/usage-agreements/{first['id']}/activate-escrow",
                                        parties.signed_activation(first["id"]))
    assert queued.status_code == 202, queued.content

    refused = parties.buyer_api.post(f"/usage-agreements/{second['id']}/activate-escrow",
                                     parties.signed_activation(second["id"]))

    assert refused.status_code == 402, refused.content
    assert error_code(refused) == "insufficient_balance"
    assert refused.json()["error"]["details"]["committed"] == required
    assert not ChainTransaction.objects.filter(agreement_id=second["id"]).exists()
    with django_capture_on_commit_callbacks(execute=True):
        for callback in submit:
            callback()
    confirm_all(django_capture_on_commit_callbacks)
    assert parties.agreement(first["id"])["status"] == "active"


def test_a_second_activation_signed_while_the_wallets_first_is_not_mined_is_refused_not_reverted(
        escrow_chain, django_capture_on_commit_callbacks):
    """Both packages fetched before either activation is mined carry the same token permit nonce: the first's permit
    spends it and its pull the allowance, so the second was queued and reverted InsufficientAllowance at the relayer's
    gas (the agreement `activation_failed`, a revert charged to the buyer). The second is 409
    `wallet_activation_in_progress`, nothing queued; signed again once the first is mined, it activates."""
    parties = Parties(escrow_chain)
    first, second = parties.accepted_agreement(), parties.accepted_agreement()
    bodies = {agreement["id"]: parties.signed_activation(agreement["id"]) for agreement in (first, second)}
    assert bodies[first["id"]]["escrow_permit"]["nonce"] == bodies[second["id"]]["escrow_permit"]["nonce"]
    with django_capture_on_commit_callbacks(execute=False) as submit:
        queued = parties.buyer_api.post(f"/usage-agreements/{first['id']}/activate-escrow", bodies[first["id"]])
        refused = parties.buyer_api.post(f"/usage-agreements/{second['id']}/activate-escrow", bodies[second["id"]])
    assert queued.status_code == 202, queued.content
    with django_capture_on_commit_callbacks(execute=True):
        for callback in submit:
            callback()
    confirm_all(django_capture_on_commit_callbacks)

    assert parties.agreement(second["id"])["status"] == "accepted", parties.agreement(second["id"])
    assert refused.status_code == 409, refused.content
    assert error_code(refused) == "wallet_activation_in_progress"
    assert refused.json()["error"]["details"]["agreement_id"] == first["id"]
    assert not ChainTransaction.objects.filter(agreement_id=second["id"]).exists()
    assert parties.agreement(first["id"])["status"] == "active"
    assert parties.activate(second["id"], django_capture_on_commit_callbacks).status_code == 202
    assert parties.agreement(second["id"])["status"] == "active"


def test_two_activations_at_once_send_one_transaction(parties, django_capture_on_commit_callbacks):
    agreement = parties.accepted_agreement()
    body = parties.signed_activation(agreement["id"])
    url = f"/usage-agreements/{agreement['id']}/activate-escrow"
    first = parties.buyer_api.post(url, body)
    second = parties.buyer_api.post(url, body)
    assert first.status_code == 202
    assert second.status_code == 409 and error_code(second) == "activation_in_progress"
    assert ChainTransaction.objects.filter(agreement_id=agreement["id"]).count() == 1


def test_only_the_buyer_activates_and_only_when_accepted(parties):
    agreement = parties.accepted_agreement()
    seller_try = parties.seller_api.get(f"/usage-agreements/{agreement['id']}/activation-package")
    assert seller_try.status_code == 403 and error_code(seller_try) == "buyer_only"  # as on the proxy
    from tests.agreements.helpers import propose

    proposed = propose(parties.buyer_api, parties.service)
    early = parties.buyer_api.get(f"/usage-agreements/{proposed['id']}/activation-package")
    assert early.status_code == 409 and error_code(early) == "invalid_transition"


def test_reverted_activation_fails_with_reason_and_can_be_signed_again(parties, escrow_chain,
                                                                       django_capture_on_commit_callbacks):
    chain = escrow_chain
    agreement = parties.accepted_agreement()
    body = parties.signed_activation(agreement["id"])
    # The buyer spends its funds between signing and submission: the on-chain pull must fail.
    balance = usdc_balance(chain, parties.buyer_account.address)
    chain.usdc.functions.transfer(chain.accounts.spare.address, balance).transact(
        {"from": parties.buyer_account.address})
    from tests.escrow.flow import fund

    fund(chain, parties.buyer_account.address, 0)
    response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)
    assert response.status_code == 402  # caught off-chain first
    # Now bypass the off-chain check: the balance is there at submission, gone when the relayer simulates.
    fund(chain, parties.buyer_account.address, balance)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow",
                                      body).status_code == 202
    chain.usdc.functions.transfer(chain.accounts.spare.address, balance).transact(
        {"from": parties.buyer_account.address})
    mined_what_was_sent()  # before the relayer simulates the pull (Anvil answers a send before it mines it)
    for callback in callbacks:
        callback()
    failed = parties.agreement(agreement["id"])
    assert failed["status"] == "activation_failed"
    assert "ERC20InsufficientBalance" in failed["status_reason"]
    assert usdc_balance(chain, chain.addresses["escrow"]) == 0

    fund(chain, parties.buyer_account.address, balance)
    retry = parties.activate(agreement["id"], django_capture_on_commit_callbacks)
    assert retry.status_code == 202
    assert parties.agreement(agreement["id"])["status"] == "active"


def _front_run(chain, signed: dict) -> None:
    """A third party submits the buyer's signed permit to the token before the relayer's activation."""
    from sdk.typed_data import split_signature

    permit = signed["escrow_permit"]
    v, r, s = split_signature(permit["signature"])
    chain.usdc.functions.permit(chain.accounts.buyer.address, chain.addresses["escrow"], permit["value"],
                                permit["deadline"], v, r, s).transact({"from": chain.accounts.stranger.address})
    mined_what_was_sent()  # before the activation reads the permit's nonce (Anvil answers a send before it mines it)


def test_a_permit_front_run_before_submission_still_activates(parties, escrow_chain,
                                                                django_capture_on_commit_callbacks):
    agreement = parties.accepted_agreement(quantity=100)
    body = parties.signed_activation(agreement["id"])
    _front_run(escrow_chain, body)  # the token's nonce has moved on; the allowance covers deposit + fee

    response = parties.activate(agreement["id"], django_capture_on_commit_callbacks, body)
    assert response.status_code == 202, response.content
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert usdc_balance(escrow_chain, escrow_chain.addresses["escrow"]) == 2 * USDC


def test_a_permit_front_run_while_the_activation_is_in_flight_still_activates(parties, escrow_chain,
                                                                               django_capture_on_commit_callbacks):
    chain = escrow_chain
    agreement = parties.accepted_agreement(quantity=100)
    fee_before = usdc_balance(chain, chain.accounts.fee_recipient.address)
    body = parties.signed_activation(agreement["id"])
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)
    assert response.status_code == 202, response.content
    _front_run(chain, body)  # between the API's checks and the relayer's transaction
    with django_capture_on_commit_callbacks(execute=True):
        for callback in callbacks:
            callback()
    confirm_all(django_capture_on_commit_callbacks)
    pay_fees(chain)

    assert parties.agreement(agreement["id"])["status"] == "active"
    assert usdc_balance(chain, chain.addresses["escrow"]) == 2 * USDC
    assert usdc_balance(chain, chain.accounts.fee_recipient.address) == fee_before + 100_000


def test_a_spent_permit_without_the_allowance_is_refused(parties, escrow_chain):
    chain = escrow_chain
    agreement = parties.accepted_agreement(quantity=100)
    body = parties.signed_activation(agreement["id"])
    _front_run(chain, body)
    chain.usdc.functions.approve(chain.addresses["escrow"], 0).transact({"from": parties.buyer_account.address})
    mined_what_was_sent()
    response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)
    assert response.status_code == 400 and error_code(response) == "wrong_permit_nonce"


def test_the_nodes_chain_id_is_asked_once_per_recheck_period(parties, escrow_chain, settings,
                                                             django_capture_on_commit_callbacks):
    """web3 checks a call's chain id against the node's before every eth_call, estimate and send: the node's is
    asked once per CHAIN_ID_RECHECK_SECONDS (a provider may move to another network), not once per call."""
    settings.CHAIN_ID_RECHECK_SECONDS = 3600
    relay = RpcRelay(escrow_chain.node.rpc_url).start()
    settings.CHAIN_RPC_URL = relay.url
    try:
        asked = Counter()
        relay.observers.append(lambda call: asked.update([call["method"]]))
        for _ in range(2):
            agreement = parties.accepted_agreement(quantity=100)
            response = parties.activate(agreement["id"], django_capture_on_commit_callbacks)
            assert response.status_code == 202, response.content
            assert parties.agreement(agreement["id"])["status"] == "active"
    finally:
        relay.stop()
    assert asked["eth_chainId"] <= 1, asked


def test_escrow_status_reads_asked_in_a_burst_ask_the_node_for_its_head_once(
        parties, escrow_chain, settings, django_capture_on_commit_callbacks):
    """escrow-status (a read key's GET, as cheap as a caller likes) asked the node for its head on every request, to
    count confirmations: any agent multiplied the calls the platform pays a metered RPC provider for. The head is
    read at most once per CHAIN_HEAD_SHOWN_SECONDS per process, a failed read too (a node down held each request for
    its RPC timeout)."""
    agreement = parties.accepted_agreement(quantity=100)
    assert parties.activate(agreement["id"], django_capture_on_commit_callbacks).status_code == 202
    settings.CHAIN_HEAD_SHOWN_SECONDS = 3600
    relay = RpcRelay(escrow_chain.node.rpc_url).start()
    settings.CHAIN_RPC_URL = relay.url
    try:
        asked = Counter()
        relay.observers.append(lambda call: asked.update([call["method"]]))
        for _ in range(20):
            status = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/escrow-status").json()
            assert status["transactions"][0]["confirmations"] >= 1
    finally:
        relay.stop()
    assert asked["eth_blockNumber"] <= 1, asked


def test_a_node_answering_a_pending_block_in_the_future_does_not_refuse_a_valid_activation_as_expired(
        parties, escrow_chain, settings, django_capture_on_commit_callbacks):
    """The activation's signature deadlines were checked against the node's pending block's timestamp, unchecked: a
    node answering one past the deadline (a misbehaving provider, a clock gone wrong) had the buyer's valid
    activation refused 400 signature_expired, its escrow never funded. The pending timestamp is believed no further
    than the later of the latest block's and our clock's, as for a challenge."""
    agreement = parties.accepted_agreement(quantity=100)
    body = parties.signed_activation(agreement["id"])
    with node_block_times(escrow_chain.node.rpc_url, settings, pending=body["deadline"] + 3600):
        response = parties.activate(agreement["id"], django_capture_on_commit_callbacks, body)
    assert response.status_code == 202, response.content
    assert parties.agreement(agreement["id"])["status"] == "active"


def test_an_agreement_whose_term_ended_on_the_chains_clock_is_refused_before_anything_is_queued(parties,
                                                                                                escrow_chain):
    """Activation compared the term with our clock only: the chain's, ahead of it, had passed the escrow's
    expiresAt, the contract refuses such an escrow (InvalidExpiry), and the relayer was given it all the same."""
    agreement = parties.accepted_agreement(expires_at=(timezone.now() + timedelta(minutes=10)).isoformat())
    body = parties.signed_activation(agreement["id"])  # valid for ACTIVATION_SIGNATURE_TTL (30 minutes)
    escrow_chain.increase_time(15 * 60)

    response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)
    assert response.status_code == 409, response.content
    assert error_code(response) == "agreement_expired"
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()
    assert parties.agreement(agreement["id"])["status"] == "accepted"


def test_an_activation_in_the_last_fraction_of_a_second_of_its_term_is_refused_before_anything_is_queued(
        parties, escrow_chain):
    """The escrow's expiresAt is the term in whole seconds, rounded down (the intent's `expiresAt`). At that second
    on the chain's clock the term's fraction still lay ahead, so the activation was queued, and the contract refused
    it (InvalidExpiry: expiresAt <= block.timestamp) at the relayer's expense."""
    start = max(escrow_chain.now(), int(time.time()))
    expires_at = datetime.fromtimestamp(start + 600, tz=UTC) + timedelta(milliseconds=900)
    agreement = parties.accepted_agreement(expires_at=expires_at.isoformat())
    body = parties.signed_activation(agreement["id"])
    escrow_chain.set_next_timestamp(start + 599)
    escrow_chain.mine()  # the next block's time: start + 600, the escrow's expiresAt

    response = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)
    assert response.status_code == 409, response.content
    assert error_code(response) == "agreement_expired"
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"]).exists()


def test_an_escrow_above_a_since_lowered_platform_limit_is_refused_at_activation_with_nothing_moved(
        parties, escrow_chain, settings, django_capture_on_commit_callbacks):
    """Proposed and accepted under a higher AGREEMENT_MAX_AMOUNT, an escrow was still funded once the operator
    lowered it: only the proposal checked the ceiling. The ceiling in force when the money moves binds: activate-escrow
    is 400 `amount_too_large`, the agreement stays accepted, nothing queued or moved; at the limit it is funded."""
    agreement = parties.accepted_agreement(quantity=100)  # deposit 2 USDC
    body = parties.signed_activation(agreement["id"])
    before = usdc_balance(escrow_chain, parties.buyer_account.address)
    settings.AGREEMENT_MAX_AMOUNT = 2 * USDC - 1

    with django_capture_on_commit_callbacks(execute=True):
        refused = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", body)

    assert refused.status_code == 400 and error_code(refused) == "amount_too_large", refused.content
    assert refused.json()["error"]["details"] == {"max_amount_atomic": 2 * USDC - 1}
    after = UsageAgreement.objects.get(pk=agreement["id"])
    assert (after.status, after.funds_moved_at) == ("accepted", None)
    assert not ChainTransaction.objects.exists()
    assert usdc_balance(escrow_chain, parties.buyer_account.address) == before
    settings.AGREEMENT_MAX_AMOUNT = 2 * USDC
    assert parties.activate(agreement["id"], django_capture_on_commit_callbacks, body).status_code == 202
    assert parties.agreement(agreement["id"])["status"] == "active"
