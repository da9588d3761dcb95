"""A buyer who revoked its signed activation intent on-chain (`cancelIntentNonce`) signs a new one for the same
agreement: the platform hands out a fresh intent nonce, and the revoked intent stays dead."""

import pytest
from django.core.management import call_command

from sdk import typed_data as td
from sdk.activation import activation_intent_nonce
from tests.conftest import error_code
from tests.escrow.conftest import Escrows
from tests.escrow.flow import Parties, confirm_all, sign_activation, usdc_balance

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def package_and_signature(parties, agreement_id: str) -> tuple[dict, dict]:
    package = parties.buyer_api.get(f"/usage-agreements/{agreement_id}/activation-package")
    assert package.status_code == 200, package.content
    return package.json(), sign_activation(parties.chain, package.json(), parties.agreement(agreement_id),
                                           parties.buyer_account.key)


def onchain_permit(signed: dict):
    permit = signed["escrow_permit"]
    return td.onchain_permit(value=permit["value"], deadline=permit["deadline"], signature=permit["signature"])


def test_a_buyer_who_cancelled_its_intent_nonce_activates_with_a_fresh_one(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    chain, capture = escrow_chain, django_capture_on_commit_callbacks
    esc = Escrows(chain)
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    old_package, old_signed = package_and_signature(parties, agreement["id"])
    old_nonce = old_package["intent"]["message"]["nonce"]
    assert old_nonce == activation_intent_nonce(old_package["onchain_id"])
    esc.tx(chain.escrow.functions.cancelIntentNonce(old_nonce), parties.buyer_account)

    package, signed = package_and_signature(parties, agreement["id"])
    nonce = package["intent"]["message"]["nonce"]
    assert nonce != old_nonce, "the package still carries the cancelled nonce"
    assert nonce == activation_intent_nonce(package["onchain_id"], package["intent_nonce_round"])
    assert not chain.escrow.functions.intentNonceUsed(parties.buyer_account.address, nonce).call()
    again, _ = package_and_signature(parties, agreement["id"])  # a nonce still live is kept
    assert again["intent"]["message"]["nonce"] == nonce

    # The revoked intent stays dead: the API refuses its signature, the contract its nonce.
    refused = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", old_signed)
    assert refused.status_code == 400 and error_code(refused) == "wrong_signer", refused.content
    esc.reverts(esc.activate_fn(old_package["intent"], old_signed["intent_signature"], onchain_permit(old_signed)),
                chain.accounts.stranger, "IntentNonceUsed")

    response = parties.activate(agreement["id"], capture, signed)
    assert response.status_code == 202, response.content
    assert parties.agreement(agreement["id"])["status"] == "active"
    assert usdc_balance(chain, chain.addresses["escrow"]) == agreement["deposit_amount_atomic"]
    # Its nonce is now used by the escrow itself: no fresh one is handed out for a funded agreement.
    assert parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package").status_code == 409
    confirm_all(capture)
    call_command("reconcile")


def test_a_nonce_spent_by_an_escrow_of_the_agreement_is_not_replaced(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    """The intent's nonce is used because the intent funded the escrow (relayed by anyone, not indexed yet): no fresh
    nonce, or a second signed intent would be out for an agreement already funded."""
    chain = escrow_chain
    esc = Escrows(chain)
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    package, signed = package_and_signature(parties, agreement["id"])
    esc.tx(esc.activate_fn(package["intent"], signed["intent_signature"], onchain_permit(signed)),
           chain.accounts.stranger)
    again = parties.buyer_api.get(f"/usage-agreements/{agreement['id']}/activation-package")
    assert again.status_code == 200, again.content
    assert again.json()["intent"]["message"]["nonce"] == package["intent"]["message"]["nonce"]
    assert "intent_nonce_round" not in again.json()


def test_an_intent_whose_nonce_the_buyer_cancelled_is_not_relayed_when_posted_without_a_new_package(
        escrow_chain, http_server, django_capture_on_commit_callbacks):
    """The buyer cancels its intent's nonce on-chain (one transaction of its own) and posts the signed intent again
    without asking for a new package: accepted, it was relayed to revert IntentNonceUsed at the relayer's expense,
    as often as the buyer posted it. activate-escrow renews the nonce first, as the package does: wrong_signer,
    nothing queued."""
    from escrow.models import ChainTransaction, TxPurpose

    chain = escrow_chain
    esc = Escrows(chain)
    parties = Parties(chain, upstream_base_url=http_server.url)
    agreement = parties.accepted_agreement(quantity=10)
    package, signed = package_and_signature(parties, agreement["id"])
    esc.tx(chain.escrow.functions.cancelIntentNonce(package["intent"]["message"]["nonce"]), parties.buyer_account)

    with django_capture_on_commit_callbacks(execute=False):
        refused = parties.buyer_api.post(f"/usage-agreements/{agreement['id']}/activate-escrow", signed)
    assert refused.status_code == 400 and error_code(refused) == "wrong_signer", refused.content
    assert not ChainTransaction.objects.filter(agreement_id=agreement["id"], purpose=TxPurpose.ACTIVATE).exists()
    assert parties.agreement(agreement["id"])["status"] == "accepted"
