"""The migration that made a relay revert record its payer (escrow 0018): rows and relayed transactions in flight
from before it are filled from what their transaction paid, not from who holds the wallet now."""

import importlib

import pytest
from django.apps import apps
from django.utils import timezone

from catalog.models import Agent
from escrow import relayer
from escrow.models import ChainTransaction, RelayRevert
from tests.escrow.flow import Parties

pytestmark = [pytest.mark.chain, pytest.mark.django_db]

fill = importlib.import_module("escrow.migrations.0018_relay_revert_records_wallet_owner_client").relay_payers_fill


def test_an_agreements_old_revert_and_relayed_transaction_in_flight_get_the_agreements_buyer_wallet(escrow_chain):
    parties = Parties(escrow_chain)
    agreement_id = parties.accepted_agreement()["id"]
    party = relayer.relay_party(agent_id=parties.buyer.pk)
    reverted, in_flight = (ChainTransaction.objects.create(
        purpose="activate", agreement_id=agreement_id, to_address=escrow_chain.usdc.address, data="0x",
        chain_id=escrow_chain.chain_id, status=status, context={relayer.RELAYED_FOR: party})
        for status in ("failed", "submitted"))
    RelayRevert.objects.create(transaction=reverted, party=party, reverted_at=timezone.now())
    wallet = parties.buyer.wallet_address
    Agent.objects.filter(pk=parties.buyer.pk).update(wallet_address=escrow_chain.accounts.buyer2.address)

    fill(apps, None)

    revert = RelayRevert.objects.get()
    assert (revert.wallet, revert.owner_id, revert.client) == (wallet, parties.buyer.owner_id, "")
    in_flight.refresh_from_db()
    assert in_flight.context == {relayer.RELAYED_FOR: party, relayer.RELAYED_WALLET: wallet,
                                 relayer.RELAYED_OWNER: parties.buyer.owner_id, relayer.RELAYED_CLIENT: ""}
