"""Each policy's list rules rewritten in the form the API writes (`policies.rules`), so evaluation reads them as
they are. One that cannot be (a number, a mapping, an entry that is no text or no service id) is left as it was and
logged: evaluation denies every purchase by it (fails closed) until its owner sets it again."""

import logging

from django.db import migrations

from policies.rules import LIST_RULES, RuleNotNormalisable, rule_normalised

logger = logging.getLogger("policies.migrations")


def policy_rules_canonical(apps, schema_editor):
    Policy = apps.get_model("policies", "Policy")
    for policy in Policy.objects.order_by("pk").iterator():
        changed = []
        for name in LIST_RULES:
            stored = getattr(policy, name)
            try:
                normalised = rule_normalised(name, stored)
            except RuleNotNormalisable as why:
                logger.warning("policy rule not normalised: it denies every purchase of the agent until set again",
                               extra={"agent_id": str(policy.pk), "rule": name, "reason": str(why)})
                continue
            if normalised != stored:
                setattr(policy, name, normalised)
                changed.append(name)
        if changed:
            policy.save(update_fields=changed)


class Migration(migrations.Migration):
    dependencies = [("policies", "0004_admin_approvals_read_indexes")]

    operations = [migrations.RunPython(policy_rules_canonical, migrations.RunPython.noop)]
