"""MockUSDC: metadata, owner-only mint, EIP-2612 permit (domain "USD Coin"/"2"), EIP-3009, blacklist."""

import pytest
from eth_utils import keccak

from sdk import typed_data as td
from tests.escrow.conftest import USDC, random_bytes32

pytestmark = pytest.mark.chain


def test_metadata(chain):
    usdc = chain.usdc
    assert usdc.functions.name().call() == "USD Coin"
    assert usdc.functions.symbol().call() == "USDC"
    assert usdc.functions.decimals().call() == 6
    assert usdc.functions.version().call() == "2"
    _, name, version, chain_id, contract, _, _ = usdc.functions.eip712Domain().call()
    assert (name, version, chain_id, contract) == ("USD Coin", "2", chain.chain_id, usdc.address)
    domain_type = b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    expected = keccak(
        keccak(domain_type) + keccak(b"USD Coin") + keccak(b"2") + chain.chain_id.to_bytes(32, "big")
        + bytes.fromhex(usdc.address[2:]).rjust(32, b"\0")
    )
    assert usdc.functions.DOMAIN_SEPARATOR().call() == expected
    # USDC's typehashes
    assert usdc.functions.TRANSFER_WITH_AUTHORIZATION_TYPEHASH().call().hex() == (
        "7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267"
    )
    assert usdc.functions.RECEIVE_WITH_AUTHORIZATION_TYPEHASH().call().hex() == (
        "d099cc98ef71107a616c4f0f941f04c322d8e254fe26b3c6668db87aae413de8"
    )
    assert usdc.functions.CANCEL_AUTHORIZATION_TYPEHASH().call().hex() == (
        "158b0a9edf7a828aad02f63cd515c68ef2f50ba807396f6d12842833a1597429"
    )


def test_mint_is_owner_only(esc):
    receipt = esc.tx(esc.usdc.functions.mint(esc.acc.buyer.address, 5 * USDC), esc.acc.deployer)
    assert esc.event(receipt, "Transfer", esc.usdc)["value"] == 5 * USDC
    assert esc.balance(esc.acc.buyer) == 5 * USDC
    esc.reverts(
        esc.usdc.functions.mint(esc.acc.stranger.address, 1), esc.acc.stranger, "OwnableUnauthorizedAccount",
        esc.acc.stranger.address,
    )


# ------------------------------------------------------------------ EIP-2612


def _permit_args(esc, owner, spender, value, deadline, nonce=None, signer=None):
    nonce = esc.usdc.functions.nonces(owner.address).call() if nonce is None else nonce
    typed = td.erc2612_permit(
        chain_id=esc.chain_id, token_address=esc.usdc.address, owner=owner.address, spender=spender.address,
        value=value, nonce=nonce, deadline=deadline,
    )
    signature = td.sign_typed_data((signer or owner).key, typed)
    return typed, signature


def test_permit_vrs(esc, chain):
    acc = esc.acc
    deadline = chain.now() + 100
    _, signature = _permit_args(esc, acc.buyer, acc.seller, 7 * USDC, deadline)
    v, r, s = td.split_signature(signature)
    fn = esc.usdc.functions.permit(acc.buyer.address, acc.seller.address, 7 * USDC, deadline, v, r, s)
    esc.tx(fn, acc.stranger)
    assert esc.usdc.functions.allowance(acc.buyer.address, acc.seller.address).call() == 7 * USDC
    assert esc.usdc.functions.nonces(acc.buyer.address).call() == 1
    # replay: the nonce moved on, so the signature no longer matches
    esc.reverts(fn, acc.stranger, "ERC2612InvalidSigner", acc.buyer.address)


def test_permit_bytes_signature(esc, chain):
    acc = esc.acc
    deadline = chain.now() + 100
    _, signature = _permit_args(esc, acc.buyer, acc.seller, 3, deadline)
    fn = esc.usdc.get_function_by_signature("permit(address,address,uint256,uint256,bytes)")(
        acc.buyer.address, acc.seller.address, 3, deadline, signature
    )
    esc.tx(fn, acc.stranger)
    assert esc.usdc.functions.allowance(acc.buyer.address, acc.seller.address).call() == 3


def test_permit_wrong_signer_and_expired(esc, chain):
    acc = esc.acc
    deadline = chain.now() + 100
    _, signature = _permit_args(esc, acc.buyer, acc.seller, 3, deadline, signer=acc.stranger)
    v, r, s = td.split_signature(signature)
    fn = esc.usdc.functions.permit(acc.buyer.address, acc.seller.address, 3, deadline, v, r, s)
    esc.reverts(fn, acc.stranger, "ERC2612InvalidSigner")

    _, signature = _permit_args(esc, acc.buyer, acc.seller, 3, deadline)
    v, r, s = td.split_signature(signature)
    fn = esc.usdc.functions.permit(acc.buyer.address, acc.seller.address, 3, deadline, v, r, s)
    chain.set_next_timestamp(deadline + 1)
    chain.mine()
    esc.reverts(fn, acc.stranger, "ERC2612ExpiredSignature", deadline)


def test_permit_signed_for_version_1_is_rejected(esc, chain):
    """OpenZeppelin's default ERC20Permit domain (version "1") must not be what this token accepts."""
    acc = esc.acc
    deadline = chain.now() + 100
    typed = td.erc2612_permit(
        chain_id=esc.chain_id, token_address=esc.usdc.address, owner=acc.buyer.address,
        spender=acc.seller.address, value=3, nonce=0, deadline=deadline, token_version="1",
    )
    v, r, s = td.split_signature(td.sign_typed_data(acc.buyer.key, typed))
    fn = esc.usdc.functions.permit(acc.buyer.address, acc.seller.address, 3, deadline, v, r, s)
    esc.reverts(fn, acc.stranger, "ERC2612InvalidSigner")


# ------------------------------------------------------------------ EIP-3009


def _authorization(esc, builder, *, frm, to, value, valid_after, valid_before, nonce=None, signer=None):
    nonce = nonce or random_bytes32()
    typed = builder(
        chain_id=esc.chain_id, token_address=esc.usdc.address, from_address=frm.address, to_address=to.address,
        value=value, valid_after=valid_after, valid_before=valid_before, nonce=nonce,
    )
    return nonce, td.sign_typed_data((signer or frm).key, typed)


def _twa(esc, frm, to, value, valid_after, valid_before, nonce, signature, *, vrs=True, receive=False):
    name = "receiveWithAuthorization" if receive else "transferWithAuthorization"
    if vrs:
        v, r, s = td.split_signature(signature)
        fn = esc.usdc.get_function_by_signature(
            f"{name}(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
        )
        return fn(frm.address, to.address, value, valid_after, valid_before, nonce, v, r, s)
    fn = esc.usdc.get_function_by_signature(f"{name}(address,address,uint256,uint256,uint256,bytes32,bytes)")
    return fn(frm.address, to.address, value, valid_after, valid_before, nonce, signature)


@pytest.mark.parametrize("vrs", [True, False], ids=["vrs", "bytes"])
def test_transfer_with_authorization(esc, chain, vrs):
    acc = esc.acc
    esc.mint(acc.buyer, 10 * USDC)
    now = chain.now()
    nonce, signature = _authorization(
        esc, td.transfer_with_authorization, frm=acc.buyer, to=acc.seller, value=4 * USDC,
        valid_after=0, valid_before=now + 600,
    )
    fn = _twa(esc, acc.buyer, acc.seller, 4 * USDC, 0, now + 600, nonce, signature, vrs=vrs)
    receipt = esc.tx(fn, acc.stranger)  # anyone (a facilitator) may submit it
    assert esc.event(receipt, "AuthorizationUsed", esc.usdc) == {
        "authorizer": acc.buyer.address,
        "nonce": bytes.fromhex(nonce[2:]),
    }
    assert esc.balance(acc.seller) == 4 * USDC and esc.balance(acc.buyer) == 6 * USDC
    assert esc.usdc.functions.authorizationState(acc.buyer.address, nonce).call()
    esc.reverts(fn, acc.stranger, "authorization is used or canceled")


def test_transfer_with_authorization_validity_window(esc, chain):
    acc = esc.acc
    esc.mint(acc.buyer, 10 * USDC)
    now = chain.now()
    valid_after, valid_before = now + 100, now + 200
    nonce, signature = _authorization(
        esc, td.transfer_with_authorization, frm=acc.buyer, to=acc.seller, value=1, valid_after=valid_after,
        valid_before=valid_before,
    )
    fn = _twa(esc, acc.buyer, acc.seller, 1, valid_after, valid_before, nonce, signature)
    esc.reverts(fn, acc.stranger, "authorization is not yet valid")
    chain.set_next_timestamp(valid_after)  # validAfter itself is still too early
    chain.mine()
    esc.reverts(fn, acc.stranger, "authorization is not yet valid")
    chain.set_next_timestamp(valid_before)  # validBefore itself is already too late
    chain.mine()
    esc.reverts(fn, acc.stranger, "authorization is expired")


def test_transfer_with_authorization_inside_window(esc, chain):
    acc = esc.acc
    esc.mint(acc.buyer, 10 * USDC)
    now = chain.now()
    valid_after, valid_before = now + 100, now + 200
    nonce, signature = _authorization(
        esc, td.transfer_with_authorization, frm=acc.buyer, to=acc.seller, value=1, valid_after=valid_after,
        valid_before=valid_before,
    )
    chain.set_next_timestamp(valid_after + 1)
    esc.tx(_twa(esc, acc.buyer, acc.seller, 1, valid_after, valid_before, nonce, signature), acc.stranger)
    assert esc.balance(acc.seller) == 1


def test_transfer_with_authorization_bad_signature(esc, chain):
    acc = esc.acc
    esc.mint(acc.buyer, 10 * USDC)
    before = chain.now() + 600
    nonce, signature = _authorization(
        esc, td.transfer_with_authorization, frm=acc.buyer, to=acc.seller, value=5, valid_after=0,
        valid_before=before, signer=acc.stranger,
    )
    esc.reverts(_twa(esc, acc.buyer, acc.seller, 5, 0, before, nonce, signature), acc.stranger, "invalid signature")
    nonce, signature = _authorization(
        esc, td.transfer_with_authorization, frm=acc.buyer, to=acc.seller, value=5, valid_after=0,
        valid_before=before,
    )
    # redirected or enlarged by the submitter
    esc.reverts(_twa(esc, acc.buyer, acc.stranger, 5, 0, before, nonce, signature), acc.stranger, "invalid signature")
    esc.reverts(_twa(esc, acc.buyer, acc.seller, 6, 0, before, nonce, signature), acc.stranger, "invalid signature")
    # a ReceiveWithAuthorization signature is not a TransferWithAuthorization one
    nonce, signature = _authorization(
        esc, td.receive_with_authorization, frm=acc.buyer, to=acc.seller, value=5, valid_after=0,
        valid_before=before,
    )
    esc.reverts(_twa(esc, acc.buyer, acc.seller, 5, 0, before, nonce, signature), acc.stranger, "invalid signature")


@pytest.mark.parametrize("vrs", [True, False], ids=["vrs", "bytes"])
def test_receive_with_authorization_only_by_payee(esc, chain, vrs):
    acc = esc.acc
    esc.mint(acc.buyer, 10 * USDC)
    before = chain.now() + 600
    nonce, signature = _authorization(
        esc, td.receive_with_authorization, frm=acc.buyer, to=acc.seller, value=2 * USDC, valid_after=0,
        valid_before=before,
    )
    fn = _twa(esc, acc.buyer, acc.seller, 2 * USDC, 0, before, nonce, signature, vrs=vrs, receive=True)
    esc.reverts(fn, acc.stranger, "caller must be the payee")
    esc.reverts(fn, acc.buyer, "caller must be the payee")
    esc.tx(fn, acc.seller)
    assert esc.balance(acc.seller) == 2 * USDC
    esc.reverts(fn, acc.seller, "authorization is used or canceled")


def test_receive_with_authorization_rejects_transfer_signature(esc, chain):
    acc = esc.acc
    esc.mint(acc.buyer, 10 * USDC)
    before = chain.now() + 600
    nonce, signature = _authorization(
        esc, td.transfer_with_authorization, frm=acc.buyer, to=acc.seller, value=1, valid_after=0,
        valid_before=before,
    )
    fn = _twa(esc, acc.buyer, acc.seller, 1, 0, before, nonce, signature, receive=True)
    esc.reverts(fn, acc.seller, "invalid signature")


@pytest.mark.parametrize("vrs", [True, False], ids=["vrs", "bytes"])
def test_cancel_authorization(esc, chain, vrs):
    acc = esc.acc
    esc.mint(acc.buyer, 10 * USDC)
    before = chain.now() + 600
    nonce, signature = _authorization(
        esc, td.transfer_with_authorization, frm=acc.buyer, to=acc.seller, value=1, valid_after=0,
        valid_before=before,
    )
    cancel = td.cancel_authorization(
        chain_id=esc.chain_id, token_address=esc.usdc.address, authorizer=acc.buyer.address, nonce=nonce
    )
    cancel_sig = td.sign_typed_data(acc.buyer.key, cancel)
    if vrs:
        v, r, s = td.split_signature(cancel_sig)
        fn = esc.usdc.get_function_by_signature("cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)")(
            acc.buyer.address, nonce, v, r, s
        )
    else:
        fn = esc.usdc.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")(
            acc.buyer.address, nonce, cancel_sig
        )
    bad = td.sign_typed_data(acc.stranger.key, cancel)
    bad_fn = esc.usdc.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")(
        acc.buyer.address, nonce, bad
    )
    esc.reverts(bad_fn, acc.stranger, "invalid signature")
    receipt = esc.tx(fn, acc.stranger)
    assert esc.event(receipt, "AuthorizationCanceled", esc.usdc)["authorizer"] == acc.buyer.address
    esc.reverts(fn, acc.stranger, "authorization is used or canceled")
    esc.reverts(
        _twa(esc, acc.buyer, acc.seller, 1, 0, before, nonce, signature), acc.stranger,
        "authorization is used or canceled",
    )


# ------------------------------------------------------------------ blacklist


def test_blacklist_blocks_sending_and_receiving(esc, chain):
    acc, usdc = esc.acc, esc.usdc
    esc.mint(acc.buyer, 10 * USDC)
    esc.mint(acc.seller, 10 * USDC)
    receipt = esc.tx(usdc.functions.blacklist(acc.seller.address), acc.deployer)
    assert esc.event(receipt, "Blacklisted", usdc) == {"account": acc.seller.address}
    assert usdc.functions.isBlacklisted(acc.seller.address).call()

    esc.reverts(usdc.functions.transfer(acc.seller.address, 1), acc.buyer, "account is blacklisted")
    esc.reverts(usdc.functions.transfer(acc.buyer.address, 1), acc.seller, "account is blacklisted")
    esc.reverts(usdc.functions.approve(acc.buyer.address, 1), acc.seller, "account is blacklisted")
    esc.reverts(usdc.functions.approve(acc.seller.address, 1), acc.buyer, "account is blacklisted")
    esc.reverts(usdc.functions.mint(acc.seller.address, 1), acc.deployer, "account is blacklisted")
    # a blacklisted spender cannot use an allowance it was given before
    esc.unblacklist(acc.seller)
    esc.tx(usdc.functions.approve(acc.seller.address, 5), acc.buyer)
    esc.blacklist(acc.seller)
    esc.reverts(
        usdc.functions.transferFrom(acc.buyer.address, acc.stranger.address, 1), acc.seller,
        "account is blacklisted",
    )
    # EIP-3009 to a blacklisted payee
    before = chain.now() + 600
    nonce, signature = _authorization(
        esc, td.transfer_with_authorization, frm=acc.buyer, to=acc.seller, value=1, valid_after=0,
        valid_before=before,
    )
    esc.reverts(_twa(esc, acc.buyer, acc.seller, 1, 0, before, nonce, signature), acc.stranger, "blacklisted")

    receipt = esc.tx(usdc.functions.unBlacklist(acc.seller.address), acc.deployer)
    assert esc.event(receipt, "UnBlacklisted", usdc) == {"account": acc.seller.address}
    esc.tx(usdc.functions.transfer(acc.buyer.address, 1), acc.seller)


def test_blacklist_is_owner_only(esc):
    esc.reverts(esc.usdc.functions.blacklist(esc.acc.seller.address), esc.acc.stranger, "OwnableUnauthorizedAccount")
    esc.reverts(
        esc.usdc.functions.unBlacklist(esc.acc.seller.address), esc.acc.stranger, "OwnableUnauthorizedAccount"
    )


def test_x402_signed_authorization_is_accepted(esc, chain):
    """An EIP-3009 authorization hashed by the x402 SDK (as x402 clients sign it) settles on MockUSDC."""
    from eth_account import Account
    from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
    from x402.mechanisms.evm.types import ExactEIP3009Authorization

    acc = esc.acc
    esc.mint(acc.buyer, 10 * USDC)
    nonce, valid_before = random_bytes32(), chain.now() + 600
    authorization = ExactEIP3009Authorization(
        from_address=acc.buyer.address, to=acc.seller.address, value=str(3 * USDC), valid_after="0",
        valid_before=str(valid_before), nonce=nonce,
    )
    digest = hash_eip3009_authorization(authorization, esc.chain_id, esc.usdc.address, "USD Coin", "2")
    ours = td.transfer_with_authorization(
        chain_id=esc.chain_id, token_address=esc.usdc.address, from_address=acc.buyer.address,
        to_address=acc.seller.address, value=3 * USDC, valid_after=0, valid_before=valid_before, nonce=nonce,
    )
    assert "0x" + digest.hex() == td.typed_data_digest(ours)
    signature = "0x" + bytes(Account.unsafe_sign_hash(digest, acc.buyer.key).signature).hex()
    fn = _twa(esc, acc.buyer, acc.seller, 3 * USDC, 0, valid_before, nonce, signature, vrs=False)
    esc.tx(fn, acc.operator)
    assert esc.balance(acc.seller) == 3 * USDC
