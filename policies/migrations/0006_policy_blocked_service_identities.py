"""Each policy's blocked services recorded as they are now (`policies.rules.service_identity`), so that one changed
from now on to look like something else still blocks the listings again of what it is now."""

from django.db import migrations, models

from policies.rules import rule_is_canonical, service_identity


def blocked_service_identities_record(apps, schema_editor):
    Policy = apps.get_model("policies", "Policy")
    Service = apps.get_model("catalog", "Service")
    for policy in Policy.objects.exclude(blocked_services=[]).order_by("pk").iterator():
        if not rule_is_canonical("blocked_services", policy.blocked_services):
            continue  # evaluation denies every purchase by it until its owner sets it again
        policy.blocked_service_identities = [
            service_identity(service_id=pk, upstream_base_url=upstream, name=name, seller_owner_id=owner_id)
            for pk, upstream, name, owner_id in Service.objects.filter(pk__in=policy.blocked_services).values_list(
                "pk", "upstream_base_url", "name", "seller__owner_id")]
        policy.save(update_fields=["blocked_service_identities"])


class Migration(migrations.Migration):

    dependencies = [
        ("policies", "0005_policy_rules_canonical"),
        ("catalog", "0025_owner_token_issuer"),
    ]

    operations = [
        migrations.AddField(
            model_name="policy",
            name="blocked_service_identities",
            field=models.JSONField(blank=True, default=list, editable=False),
        ),
        migrations.RunPython(blocked_service_identities_record, migrations.RunPython.noop),
    ]
