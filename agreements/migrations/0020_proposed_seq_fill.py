"""Fill `proposed_seq` (added empty by 0018) for agreements proposed on-chain before it was kept: the seq of the
newest SettlementProposed event the indexer stored for the agreement that no reorg removed (the contract's
proposals only go up in seq, so the highest is its lastSeq), or of our own confirmed proposeSettlement when that is
higher (its event not indexed yet). Without it the settlement tick's re-proposal (agreements_proposed_below_their_
last_receipt) left them out: a seller's proposal of an earlier receipt stood. Those with no evidence stay null; the
selector reads the chain for them."""

from django.db import migrations

_PROPOSAL_STATUSES = ["in_challenge", "disputed", "settling"]


def proposed_seq_fill(apps, schema_editor):
    UsageAgreement = apps.get_model("agreements", "UsageAgreement")
    ChainEvent = apps.get_model("escrow", "ChainEvent")
    ChainTransaction = apps.get_model("escrow", "ChainTransaction")
    for agreement in UsageAgreement.objects.filter(status__in=_PROPOSAL_STATUSES, proposed_seq__isnull=True):
        seqs = [int(args.get("seq", 0)) for args in ChainEvent.objects.filter(
            agreement_id=agreement.pk, name="SettlementProposed", removed_at=None,
            effect__in=["applied", "already"]).values_list("args", flat=True)]
        seqs += [int(context.get("seq", 0)) for context in ChainTransaction.objects.filter(
            agreement_id=agreement.pk, purpose="propose_settlement", status="confirmed").values_list(
            "context", flat=True)]
        if seqs:
            UsageAgreement.objects.filter(pk=agreement.pk, proposed_seq__isnull=True).update(proposed_seq=max(seqs))


class Migration(migrations.Migration):

    dependencies = [
        ("agreements", "0019_intent_nonce_round"),
        ("escrow", "0013_payout_held_until_final"),
    ]

    operations = [
        migrations.RunPython(proposed_seq_fill, migrations.RunPython.noop),
    ]
