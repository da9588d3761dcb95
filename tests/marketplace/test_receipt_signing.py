"""The platform's receipt signature (marketplace.signatures.receipt_sign): byte for byte eth-account's."""

import secrets

from eth_account import Account

from marketplace.signatures import receipt_sign


def test_receipt_signatures_are_eth_accounts_unsafe_sign_hash_byte_for_byte():
    # Signed with libsecp256k1 directly for speed: the same r ‖ s ‖ v (v = 27/28) as eth-account, for a key given
    # as bytes, as 0x-hex text (settings) or as bare hex.
    keys = [Account.create() for _ in range(8)] + [Account.from_key("0x" + "00" * 31 + "01")]
    digests = [secrets.token_bytes(32) for _ in range(6)] + [b"\x00" * 32, b"\xff" * 32]
    parities = set()
    for signer in keys:
        for digest in digests:
            expected = "0x" + bytes(signer.unsafe_sign_hash(digest).signature).hex()
            parities.add(expected[-2:])
            for key in (signer.key, "0x" + bytes(signer.key).hex(), bytes(signer.key).hex()):
                assert receipt_sign(key, digest) == expected
    assert parities == {"1b", "1c"}  # both recovery ids were exercised
