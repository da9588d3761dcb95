"""An agent sells only while its owner's account is active too: `Agent.owner_is_active`, a copy of the owner's
is_active written whenever the owner is saved (catalog.services.agents_owner_activity_sync), so that the search's
statement and the postings read it on the seller's row they already join instead of joining the owners. The
postings' function and the sellers' trigger now follow it as they follow the seller's own is_active; the agents of
owners deactivated already are copied last (the trigger then takes their services out of the postings)."""

import importlib

from django.db import migrations, models

from marketplace.migration_operations import PostgreSQLOnlySQL

service_postings = importlib.import_module("catalog.migrations.0011_service_postings")
posting_scores = importlib.import_module("catalog.migrations.0012_posting_scores")


def on_seller(changed: list[str]) -> str:
    """The sellers' trigger function: rewrite the postings of the sellers whose `changed` columns changed."""
    return f"""
    CREATE OR REPLACE FUNCTION catalog_service_postings_on_seller() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM catalog_service_postings_write(ARRAY(
            SELECT s.id FROM catalog_service s JOIN new_rows n ON n.id = s.seller_id JOIN old_rows o ON o.id = n.id
            WHERE ({', '.join(f'n.{column}' for column in changed)})
                  IS DISTINCT FROM ({', '.join(f'o.{column}' for column in changed)})));
        RETURN NULL;
    END $$
    """


FORWARD = [
    service_postings.write_postings("score", posting_scores.SCORE, seller_sells="a.is_active AND a.owner_is_active"),
    on_seller(["is_active", "owner_is_active"]),
]
BACKWARD = [
    service_postings.write_postings("score", posting_scores.SCORE),
    on_seller(["is_active"]),
]


def copy_owners_activity(apps, schema_editor):
    Agent = apps.get_model("catalog", "Agent")
    Agent.objects.filter(owner__is_active=False).update(owner_is_active=False)


class Migration(migrations.Migration):

    dependencies = [
        ('catalog', '0016_replaced_secret_sweep_index'),
    ]

    operations = [
        migrations.AddField(
            model_name='agent',
            name='owner_is_active',
            field=models.BooleanField(default=True, editable=False, help_text="Whether the owner's account is active: an agent of a deactivated owner sells nothing, as a deactivated agent (hidden from search, its skills 404, its services refused)."),
        ),
        PostgreSQLOnlySQL(FORWARD, BACKWARD),
        migrations.RunPython(copy_owners_activity, migrations.RunPython.noop),
    ]
