"""Sign an activation package (GET /usage-agreements/{id}/activation-package) with the buyer's wallet key.

The result is the body of POST /usage-agreements/{id}/activate-escrow. Nothing here talks to the network.
"""

from typing import Any

from eth_account import Account

from sdk.typed_data import recover_typed_data_signer, sign_typed_data


def _signed_permit(typed: dict[str, Any], private_key: str) -> dict[str, Any]:
    message = typed["message"]
    return {"value": int(message["value"]), "nonce": int(message["nonce"]), "deadline": int(message["deadline"]),
            "signature": sign_typed_data(private_key, typed)}


def sign_activation_package(package: dict[str, Any], private_key: str) -> dict[str, Any]:
    """Sign the intent and permits; refuses a package that is not for this key's address."""
    wallet = Account.from_key(private_key).address
    buyer = package["intent"]["message"]["buyer"]
    if buyer.lower() != wallet.lower():
        raise ValueError(f"The package is for the buyer wallet {buyer}, not {wallet}.")
    body = {
        "intent_signature": sign_typed_data(private_key, package["intent"]),
        "deadline": int(package["deadline"]),
        "escrow_permit": _signed_permit(package["escrow_permit"], private_key),
        "fee_permit": _signed_permit(package["fee_permit"], private_key) if package.get("fee_permit") else None,
    }
    assert recover_typed_data_signer(package["intent"], body["intent_signature"]) == wallet
    return body
