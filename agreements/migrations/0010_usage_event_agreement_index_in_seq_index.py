import django.db.models.deletion
from django.db import migrations, models

# The index Django made for the foreign key (its name is a hash of the table and column, the same everywhere).
AGREEMENT_INDEX = "agreements_usageevent_agreement_id_3c850c0c"


def _agreement_only_indexes(schema_editor, table: str) -> list[str]:
    """The plain indexes on agreement_id alone (not the unique (agreement, seq) one, not the foreign key)."""
    with schema_editor.connection.cursor() as cursor:
        constraints = schema_editor.connection.introspection.get_constraints(cursor, table)
    return [name for name, details in constraints.items()
            if details["index"] and details["columns"] == ["agreement_id"] and not details["unique"]
            and not details["primary_key"] and not details["foreign_key"]]


def drop_agreement_index(apps, schema_editor):
    # Only the index: Django's AlterField would also drop and re-add (and so re-validate) the foreign key.
    table, quote = apps.get_model("agreements", "UsageEvent")._meta.db_table, schema_editor.quote_name
    for name in _agreement_only_indexes(schema_editor, table):
        schema_editor.execute(f"DROP INDEX {quote(name)}")


def create_agreement_index(apps, schema_editor):
    table, quote = apps.get_model("agreements", "UsageEvent")._meta.db_table, schema_editor.quote_name
    if not _agreement_only_indexes(schema_editor, table):
        schema_editor.execute(f"CREATE INDEX {quote(AGREEMENT_INDEX)} ON {quote(table)} ({quote('agreement_id')})")


class Migration(migrations.Migration):
    """Usage events lose their index on agreement_id alone: the unique (agreement, seq) index begins with it and
    serves every lookup by agreement (listing, the reaper's and replays' lookups, PROTECT's check), and one index
    less is one write less per event."""

    dependencies = [
        ('agreements', '0009_paegents_webhooks_inbox'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='usageevent',
                    name='agreement',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT,
                                            related_name='usage_events', to='agreements.usageagreement'),
                ),
            ],
            database_operations=[migrations.RunPython(drop_agreement_index, create_agreement_index)],
        ),
    ]
