"""A relay revert records the wallet that paid, the agent's owner and an anonymous payer's client network
(relayer.relay_budget_check counts the wallet and owner bounds from them; before, a wallet's reverts were found
through the agents holding it now, so an agent that changed wallet took them along). Existing rows, and relayed
transactions still in flight (whose revert is recorded from their context), are filled from what the transaction
paid: its agreement's buyer wallet, or its skill invocation's authorization payer, or an anonymous party's own
wallet; the owner is the agent's. The client network of an old anonymous revert is not known: left blank."""

from django.conf import settings
from django.db import migrations, models

import marketplace.fields

_AGENT_PREFIX, _ANONYMOUS_PREFIX = "agent:", "wallet:"
_IN_FLIGHT = ["queued", "submitted", "mined"]


def _payer_of(apps, tx, party: str) -> tuple[str, int | None]:
    """The wallet that paid `tx`, relayed for `party`, and the party's owner (None: anonymous)."""
    if party.startswith(_ANONYMOUS_PREFIX):
        return party.removeprefix(_ANONYMOUS_PREFIX), None
    Agent = apps.get_model("catalog", "Agent")
    owner_id = Agent.objects.filter(pk=party.removeprefix(_AGENT_PREFIX)).values_list("owner_id", flat=True).first()
    if tx.agreement_id is not None:
        UsageAgreement = apps.get_model("agreements", "UsageAgreement")
        wallet = UsageAgreement.objects.filter(pk=tx.agreement_id).values_list("buyer_wallet_address", flat=True)
    else:
        SkillInvocation = apps.get_model("agreements", "SkillInvocation")
        wallet = SkillInvocation.objects.filter(pk=tx.context.get("invocation_id")).values_list(
            "authorization__payer", flat=True)
    return wallet.first() or "", owner_id


def relay_payers_fill(apps, schema_editor):
    RelayRevert = apps.get_model("escrow", "RelayRevert")
    ChainTransaction = apps.get_model("escrow", "ChainTransaction")
    for revert in RelayRevert.objects.select_related("transaction").filter(wallet=""):
        revert.wallet, revert.owner_id = _payer_of(apps, revert.transaction, revert.party)
        revert.save(update_fields=["wallet", "owner"])
    for tx in ChainTransaction.objects.filter(status__in=_IN_FLIGHT, context__has_key="relayed_for").exclude(
            context__has_key="relayed_wallet"):
        wallet, owner_id = _payer_of(apps, tx, tx.context["relayed_for"])
        tx.context = {**tx.context, "relayed_wallet": wallet, "relayed_owner": owner_id, "relayed_client": ""}
        tx.save(update_fields=["context"])


class Migration(migrations.Migration):

    dependencies = [
        ("agreements", "0026_webhook_subscription_deleted_at"),
        ("catalog", "0021_service_availability_queued_at"),
        ("escrow", "0017_masumi_payment_request_price"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="relayrevert",
            name="wallet",
            field=marketplace.fields.AddressField(blank=True, default="",
                                                  help_text="The wallet that paid (blank: not known for an old row)."),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="relayrevert",
            name="owner",
            field=models.ForeignKey(blank=True, db_index=False,
                                    help_text="The agent's owner; none for an anonymous payer.", null=True,
                                    on_delete=models.PROTECT, related_name="+",
                                    to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddField(
            model_name="relayrevert",
            name="client",
            field=models.CharField(blank=True, default="", max_length=100,
                                   help_text="An anonymous payer's network address (IPv6: its /64)."),
            preserve_default=False,
        ),
        migrations.AddIndex(
            model_name="relayrevert",
            index=models.Index(fields=["wallet", "reverted_at"], name="relayrevert_wallet_at_idx"),
        ),
        migrations.AddIndex(
            model_name="relayrevert",
            index=models.Index(fields=["owner", "reverted_at"], name="relayrevert_owner_at_idx"),
        ),
        migrations.AddIndex(
            model_name="relayrevert",
            index=models.Index(fields=["client", "reverted_at"], name="relayrevert_client_at_idx"),
        ),
        migrations.AddIndex(
            model_name="relayrevert",
            index=models.Index(condition=models.Q(party__startswith="wallet:"), fields=["reverted_at"],
                               name="relayrevert_anonymous_at_idx"),
        ),
        migrations.RunPython(relay_payers_fill, migrations.RunPython.noop),
    ]
