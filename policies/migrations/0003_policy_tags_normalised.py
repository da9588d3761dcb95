"""Owners' tag rules in the form listings' tags are now kept in (marketplace.tags: NFKC, case-folded)."""

from django.db import migrations

from marketplace.tags import tag_normalise


def normalise_policy_tags(apps, schema_editor):
    Policy = apps.get_model("policies", "Policy")
    for policy in Policy.objects.order_by("pk"):
        changed = False
        for field in ("allowed_tags", "blocked_tags"):
            tags = list(dict.fromkeys(tag_normalise(tag) for tag in getattr(policy, field) if isinstance(tag, str)))
            if tags != getattr(policy, field):
                setattr(policy, field, tags)
                changed = True
        if changed:
            policy.save(update_fields=["allowed_tags", "blocked_tags"])


class Migration(migrations.Migration):
    dependencies = [("policies", "0002_approval_cancelled")]

    operations = [migrations.RunPython(normalise_policy_tags, migrations.RunPython.noop)]
