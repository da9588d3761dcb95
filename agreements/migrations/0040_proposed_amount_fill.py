"""Fill `proposed_amount` (added empty by 0039) for agreements proposed on-chain before it was kept: the amount of the
highest-seq proposal among the SettlementProposed events the indexer stored for the agreement that no reorg removed
and our own confirmed proposeSettlements (the contract's proposals only go up in seq, so the highest is the one on
the escrow). Those with no evidence stay null."""

from django.db import migrations

_PROPOSAL_STATUSES = ["in_challenge", "disputed", "settling"]
_PROPOSALS = ["propose_settlement", "masumi_refund"]  # our proposeSettlement purposes


def proposed_amount_fill(apps, schema_editor):
    UsageAgreement = apps.get_model("agreements", "UsageAgreement")
    ChainEvent = apps.get_model("escrow", "ChainEvent")
    ChainTransaction = apps.get_model("escrow", "ChainTransaction")
    for agreement in UsageAgreement.objects.filter(status__in=_PROPOSAL_STATUSES, proposed_amount__isnull=True):
        proposals = [(int(args.get("seq", 0)), int(args.get("cumulativeAmount", 0))) for args in
                     ChainEvent.objects.filter(agreement_id=agreement.pk, name="SettlementProposed", removed_at=None,
                                               effect__in=["applied", "already"]).values_list("args", flat=True)]
        proposals += [(int(context.get("seq", 0)), int(context.get("cumulative", 0))) for context in
                      ChainTransaction.objects.filter(agreement_id=agreement.pk, purpose__in=_PROPOSALS,
                                                      status="confirmed").values_list("context", flat=True)]
        if proposals:
            UsageAgreement.objects.filter(pk=agreement.pk, proposed_amount__isnull=True).update(
                proposed_amount=max(proposals)[1])


class Migration(migrations.Migration):

    dependencies = [
        ("agreements", "0039_usageagreement_proposed_amount"),
        ("escrow", "0030_admin_traffic_lists_read_indexes"),
    ]

    operations = [
        migrations.RunPython(proposed_amount_fill, migrations.RunPython.noop),
    ]
