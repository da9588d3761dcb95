"""UsageEscrow deployment, roles, admin settings, EIP-712 domain, and the SDK's digests vs the contract's."""

import io
import json

import pytest
from django.core.management import CommandError, call_command
from eth_utils import keccak
from web3.exceptions import ContractLogicError

from escrow import artifacts, devchain
from sdk import typed_data as td
from tests.escrow.conftest import ZERO_ADDRESS, random_bytes32

pytestmark = pytest.mark.chain

ADMIN_ROLE = b"\x00" * 32


def test_deployment(chain):
    escrow, acc = chain.escrow, chain.accounts
    operator_role = escrow.functions.OPERATOR_ROLE().call()
    arbiter_role = escrow.functions.ARBITER_ROLE().call()
    assert operator_role == keccak(text="OPERATOR_ROLE")
    assert arbiter_role == keccak(text="ARBITER_ROLE")
    assert escrow.functions.hasRole(ADMIN_ROLE, acc.deployer.address).call()
    assert escrow.functions.hasRole(operator_role, acc.deployer.address).call()
    assert escrow.functions.hasRole(arbiter_role, acc.arbiter.address).call()
    assert not escrow.functions.hasRole(arbiter_role, acc.deployer.address).call()
    assert escrow.functions.feeRecipient().call() == acc.fee_recipient.address
    assert escrow.functions.reclaimGrace().call() == chain.reclaim_grace
    assert escrow.functions.isTokenAllowed(chain.usdc.address).call()
    # the runtime code is the artifact's, up to the immutables (EIP-712 cache) filled in at deployment
    code = chain.w3.eth.get_code(escrow.address)
    assert len(code) == len(bytes.fromhex(artifacts.deployed_bytecode("UsageEscrow")[2:]))


def test_eip712_domain(chain):
    _, name, version, chain_id, contract, _, _ = chain.escrow.functions.eip712Domain().call()
    assert (name, version, chain_id, contract) == ("UsageEscrow", "1", chain.chain_id, chain.escrow.address)
    domain_type = b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    expected = keccak(
        keccak(domain_type)
        + keccak(b"UsageEscrow")
        + keccak(b"1")
        + chain.chain_id.to_bytes(32, "big")
        + bytes.fromhex(chain.escrow.address[2:]).rjust(32, b"\0")
    )
    assert chain.escrow.functions.DOMAIN_SEPARATOR().call() == expected


def test_typehashes_match_the_sdk(chain):
    def type_string(primary, fields):
        return f"{primary}({','.join(f['type'] + ' ' + f['name'] for f in fields)})"

    f = chain.escrow.functions
    assert f.ACTIVATION_INTENT_TYPEHASH().call() == keccak(
        text=type_string("ActivationIntent", td.ACTIVATION_INTENT_TYPE)
    )
    assert f.USAGE_RECEIPT_TYPEHASH().call() == keccak(text=type_string("UsageReceipt", td.USAGE_RECEIPT_TYPE))
    assert f.CHALLENGE_TYPEHASH().call() == keccak(text=type_string("Challenge", td.CHALLENGE_TYPE))


def test_sdk_digests_match_the_contract(esc):
    typed = esc.intent()
    assert esc.escrow.functions.activationIntentDigest(td.message_tuple(typed)).call().hex() == (
        td.typed_data_digest(typed)[2:]
    )
    agreement_id, usage_digest = random_bytes32(), random_bytes32()
    receipt = td.usage_receipt(
        chain_id=esc.chain_id, escrow_address=esc.escrow.address, agreement_id=agreement_id, seq=9,
        cumulative_amount=12345, usage_digest=usage_digest,
    )
    assert esc.escrow.functions.usageReceiptDigest(agreement_id, 9, 12345, usage_digest).call().hex() == (
        td.typed_data_digest(receipt)[2:]
    )
    challenge = td.challenge(
        chain_id=esc.chain_id, escrow_address=esc.escrow.address, agreement_id=agreement_id, deadline=77
    )
    assert esc.escrow.functions.challengeDigest(agreement_id, 77).call().hex() == (
        td.typed_data_digest(challenge)[2:]
    )


def test_set_fee_recipient(esc):
    acc = esc.acc
    receipt = esc.tx(esc.escrow.functions.setFeeRecipient(acc.spare.address), acc.deployer)
    assert esc.event(receipt, "FeeRecipientUpdated") == {"feeRecipient": acc.spare.address}
    typed, _ = esc.activate()
    esc.pay_fees()
    assert esc.balance(acc.spare) == typed["message"]["infraFee"]
    esc.reverts(esc.escrow.functions.setFeeRecipient(ZERO_ADDRESS), acc.deployer, "ZeroAddress")
    esc.reverts(
        esc.escrow.functions.setFeeRecipient(acc.stranger.address), acc.arbiter,
        "AccessControlUnauthorizedAccount", acc.arbiter.address, ADMIN_ROLE,
    )


def test_set_reclaim_grace_applies_to_new_escrows_only(esc, chain):
    acc = esc.acc
    old, _ = esc.activate()
    receipt = esc.tx(esc.escrow.functions.setReclaimGrace(60), acc.deployer)
    assert esc.event(receipt, "ReclaimGraceUpdated") == {"reclaimGrace": 60}
    new, _ = esc.activate()
    assert esc.get(old["message"]["agreementId"])["reclaimAfter"] == old["message"]["expiresAt"] + chain.reclaim_grace
    assert esc.get(new["message"]["agreementId"])["reclaimAfter"] == new["message"]["expiresAt"] + 60
    max_grace = esc.escrow.functions.MAX_RECLAIM_GRACE().call()
    esc.reverts(esc.escrow.functions.setReclaimGrace(max_grace + 1), acc.deployer, "InvalidReclaimGrace")
    esc.reverts(esc.escrow.functions.setReclaimGrace(1), acc.stranger, "AccessControlUnauthorizedAccount")


def test_set_token_allowed(esc):
    acc = esc.acc
    receipt = esc.tx(esc.escrow.functions.setTokenAllowed(acc.spare.address, True), acc.deployer)
    assert esc.event(receipt, "TokenAllowed") == {"token": acc.spare.address, "allowed": True}
    assert esc.escrow.functions.isTokenAllowed(acc.spare.address).call()
    esc.reverts(esc.escrow.functions.setTokenAllowed(ZERO_ADDRESS, True), acc.deployer, "ZeroAddress")
    esc.reverts(
        esc.escrow.functions.setTokenAllowed(acc.spare.address, False), acc.seller,
        "AccessControlUnauthorizedAccount",
    )


def test_operator_cannot_administer(esc):
    """The operator role (relayer hot wallet) holds no admin powers once admin and operator are split."""
    acc = esc.acc
    role = esc.escrow.functions.OPERATOR_ROLE().call()
    esc.tx(esc.escrow.functions.grantRole(role, acc.spare.address), acc.deployer)
    denied = "AccessControlUnauthorizedAccount"
    esc.reverts(esc.escrow.functions.setFeeRecipient(acc.spare.address), acc.spare, denied)
    esc.reverts(esc.escrow.functions.grantRole(role, acc.stranger.address), acc.spare, denied)


def test_revoked_operator_cannot_propose(esc):
    acc = esc.acc
    typed, _ = esc.activate()
    role = esc.escrow.functions.OPERATOR_ROLE().call()
    esc.tx(esc.escrow.functions.revokeRole(role, acc.deployer.address), acc.deployer)
    esc.reverts(esc.propose_fn(typed["message"]["agreementId"], 1, 1), acc.deployer, "NotOperatorOrSeller")


def test_constructor_validation(chain):
    acc = chain.accounts
    w3 = chain.w3
    factory = w3.eth.contract(abi=artifacts.abi("UsageEscrow"), bytecode=artifacts.bytecode("UsageEscrow"))
    sender = {"from": acc.deployer.address}
    cases = [
        (ZERO_ADDRESS, acc.deployer.address, acc.arbiter.address, acc.fee_recipient.address, 60),
        (acc.deployer.address, acc.deployer.address, acc.arbiter.address, ZERO_ADDRESS, 60),
        (acc.deployer.address, acc.deployer.address, acc.arbiter.address, acc.fee_recipient.address, 91 * 86400),
    ]
    for args in cases:
        with pytest.raises(ContractLogicError):  # the constructor reverts
            factory.constructor(*args).estimate_gas(sender)
    # operator and arbiter may be left for later
    address = devchain.deploy_contract(
        w3, acc.deployer.key, "UsageEscrow", acc.deployer.address, ZERO_ADDRESS, ZERO_ADDRESS,
        acc.fee_recipient.address, 60,
    )
    other = devchain.escrow_contract(w3, address)
    assert not other.functions.hasRole(other.functions.OPERATOR_ROLE().call(), acc.deployer.address).call()


def test_deploy_contracts_with_existing_token_and_operator(chain):
    acc = chain.accounts
    addresses = devchain.deploy_contracts(
        chain.w3, acc.spare.key, fee_recipient=acc.fee_recipient.address, arbiter=acc.arbiter.address,
        reclaim_grace=10, operator=acc.stranger.address, usdc_address=chain.usdc.address,
    )
    assert addresses["usdc"] == chain.usdc.address
    escrow = devchain.escrow_contract(chain.w3, addresses["escrow"])
    operator_role = escrow.functions.OPERATOR_ROLE().call()
    assert escrow.functions.hasRole(operator_role, acc.stranger.address).call()
    assert not escrow.functions.hasRole(operator_role, acc.spare.address).call()
    assert escrow.functions.hasRole(ADMIN_ROLE, acc.spare.address).call()
    assert escrow.functions.isTokenAllowed(chain.usdc.address).call()


@pytest.mark.django_db
def test_deploy_contracts_keeps_the_rpc_urls_key_out_of_its_deployment_file_and_output(chain, settings, tmp_path):
    """The key CHAIN_RPC_URL holds was written whole into CHAIN_DEPLOYMENT_FILE (which nothing reads it from) and
    printed when no node answered: a file copied between hosts and a deploy's CI log held the provider's key."""
    settings.CHAIN_ID, settings.CHAIN_DEPLOYMENT_FILE = chain.chain_id, tmp_path / "deployment.json"
    settings.CHAIN_RPC_URL = f"{chain.node.rpc_url.rstrip('/')}/?apikey=key-in-the-query"
    out = io.StringIO()
    call_command("deploy_contracts", deployer_key=chain.accounts.spare.key, stdout=out)
    written = settings.CHAIN_DEPLOYMENT_FILE.read_text()
    assert "escrow" in json.loads(written) and "key-in-the" not in written + out.getvalue(), written

    # An RPC provider's URL, its key in the path, the query and the user info; no node answers there.
    settings.CHAIN_RPC_URL = "http://user:key-in-the-userinfo@127.0.0.1:9/v2/key-in-the-path?apikey=key-in-the-query"
    with pytest.raises(CommandError) as refused:
        call_command("deploy_contracts", deployer_key=chain.accounts.spare.key)
    assert "No chain answers" in str(refused.value) and "key-in-the" not in str(refused.value), refused.value
