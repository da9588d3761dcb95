"""sdk.typed_data without a chain: message shapes, validation, signing and recovery."""

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from escrow import devchain
from sdk import typed_data as td

KEY = devchain.DEV_PRIVATE_KEYS[3]
ADDRESS = devchain.DEV_ADDRESSES[3]
ESCROW = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
TOKEN = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"


def _intent(**overrides):
    args = dict(
        chain_id=31337,
        escrow_address=ESCROW.lower(),
        agreement_id="0x" + "AB" * 32,
        buyer=ADDRESS.lower(),
        seller=devchain.DEV_ADDRESSES[4],
        token=TOKEN,
        quantity=10,
        price_per_unit=100_000,
        deposit_amount=1_000_000,
        infra_fee=103_000,
        receipt_signer=devchain.DEV_ADDRESSES[5],
        challenge_window=600,
        expires_at=1_900_000_000,
        terms_hash="0x" + "01" * 32,
        nonce=7,
        deadline=1_800_000_000,
    )
    args.update(overrides)
    return td.activation_intent(**args)


def test_activation_intent_shape():
    typed = _intent()
    assert typed["primaryType"] == "ActivationIntent"
    assert typed["domain"] == {
        "name": "UsageEscrow",
        "version": "1",
        "chainId": 31337,
        "verifyingContract": ESCROW,
    }
    assert [f["name"] for f in typed["types"]["ActivationIntent"]] == [
        "agreementId", "buyer", "seller", "token", "quantity", "pricePerUnit", "depositAmount", "infraFee",
        "receiptSigner", "challengeWindow", "expiresAt", "termsHash", "nonce", "deadline",
    ]
    message = typed["message"]
    assert message["buyer"] == ADDRESS  # checksummed
    assert message["agreementId"] == "0x" + "ab" * 32  # normalised hex
    assert td.message_tuple(typed)[0] == message["agreementId"]
    assert td.message_tuple(typed)[-1] == 1_800_000_000
    encode_typed_data(full_message=typed)  # accepted by eth_account as is


def test_bytes32_as_bytes():
    typed = _intent(agreement_id=b"\x01" * 32)
    assert typed["message"]["agreementId"] == "0x" + "01" * 32


@pytest.mark.parametrize(
    "overrides",
    [
        {"deposit_amount": 999_999},
        {"agreement_id": "0x1234"},
        {"agreement_id": "ab" * 32},
        {"terms_hash": b"\x00" * 31},
        {"buyer": "0x1234"},
        {"quantity": -1, "deposit_amount": -100_000},
        {"challenge_window": 2**64},
        {"expires_at": 2**64},
        {"nonce": 2**256},
        {"infra_fee": 1.5},
        {"infra_fee": True},
    ],
)
def test_activation_intent_validation(overrides):
    with pytest.raises(ValueError):
        _intent(**overrides)


def test_sign_and_recover_every_message():
    builders = [
        _intent(),
        td.usage_receipt(
            chain_id=1, escrow_address=ESCROW, agreement_id="0x" + "11" * 32, seq=3, cumulative_amount=10,
            usage_digest="0x" + "22" * 32,
        ),
        td.challenge(chain_id=1, escrow_address=ESCROW, agreement_id="0x" + "11" * 32, deadline=5),
        td.erc2612_permit(
            chain_id=8453, token_address=TOKEN, owner=ADDRESS, spender=ESCROW, value=1, nonce=0, deadline=9
        ),
        td.transfer_with_authorization(
            chain_id=8453, token_address=TOKEN, from_address=ADDRESS, to_address=ESCROW, value=1, valid_after=0,
            valid_before=9, nonce="0x" + "33" * 32,
        ),
        td.receive_with_authorization(
            chain_id=8453, token_address=TOKEN, from_address=ADDRESS, to_address=ESCROW, value=1, valid_after=0,
            valid_before=9, nonce="0x" + "33" * 32,
        ),
        td.cancel_authorization(chain_id=8453, token_address=TOKEN, authorizer=ADDRESS, nonce="0x" + "33" * 32),
    ]
    digests = set()
    for typed in builders:
        signature = td.sign_typed_data(KEY, typed)
        assert len(bytes.fromhex(signature[2:])) == 65
        assert td.recover_typed_data_signer(typed, signature) == ADDRESS
        assert td.recover_typed_data_signer(typed, bytes.fromhex(signature[2:])) == ADDRESS
        # the same digest eth_account signs
        signed = Account.sign_message(encode_typed_data(full_message=typed), KEY)
        assert td.typed_data_digest(typed) == "0x" + bytes(signed.message_hash).hex()
        digests.add(td.typed_data_digest(typed))
    assert len(digests) == len(builders)


def test_token_domains():
    permit = td.erc2612_permit(
        chain_id=8453, token_address=TOKEN, owner=ADDRESS, spender=ESCROW, value=1, nonce=0, deadline=9
    )
    assert permit["domain"] == {"name": "USD Coin", "version": "2", "chainId": 8453, "verifyingContract": TOKEN}
    other = td.erc2612_permit(
        chain_id=8453, token_address=TOKEN, owner=ADDRESS, spender=ESCROW, value=1, nonce=0, deadline=9,
        token_name="Other", token_version="1",
    )
    assert (other["domain"]["name"], other["domain"]["version"]) == ("Other", "1")
    transfer = td.transfer_with_authorization(
        chain_id=8453, token_address=TOKEN, from_address=ADDRESS, to_address=ESCROW, value=1, valid_after=0,
        valid_before=9, nonce="0x" + "33" * 32,
    )
    receive = td.receive_with_authorization(
        chain_id=8453, token_address=TOKEN, from_address=ADDRESS, to_address=ESCROW, value=1, valid_after=0,
        valid_before=9, nonce="0x" + "33" * 32,
    )
    assert transfer["message"] == receive["message"]
    assert set(transfer["message"]) == {"from", "to", "value", "validAfter", "validBefore", "nonce"}
    assert td.typed_data_digest(transfer) != td.typed_data_digest(receive)


def test_split_signature():
    typed = _intent()
    signature = td.sign_typed_data(KEY, typed)
    v, r, s = td.split_signature(signature)
    assert v in (27, 28)
    assert r == signature[:66] and s == "0x" + signature[66:130]
    raw = bytes.fromhex(signature[2:])
    assert td.split_signature(raw[:64] + bytes([raw[64] - 27])) == (v, r, s)  # v as 0/1
    with pytest.raises(ValueError):
        td.split_signature(signature[:-2])
    with pytest.raises(ValueError):
        td.split_signature(raw[:64] + bytes([5]))


def test_onchain_permit():
    assert td.EMPTY_PERMIT[1] == 0  # deadline 0: absent
    signature = td.sign_typed_data(
        KEY,
        td.erc2612_permit(
            chain_id=1, token_address=TOKEN, owner=ADDRESS, spender=ESCROW, value=5, nonce=0, deadline=9
        ),
    )
    value, deadline, v, r, s = td.onchain_permit(value=5, deadline=9, signature=signature)
    assert (value, deadline, (v, r, s)) == (5, 9, td.split_signature(signature))
