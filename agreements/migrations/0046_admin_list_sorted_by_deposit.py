from django.db import migrations, models

INDEX = models.Index(fields=["deposit_amount", "id"], name="agreement_deposit_idx")


def index_create(apps, schema_editor):
    """Built without blocking proposals on PostgreSQL: a plain CREATE INDEX holds off every insert into the agreements
    until it is built."""
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute('CREATE INDEX CONCURRENTLY IF NOT EXISTS "agreement_deposit_idx" '
                              'ON "agreements_usageagreement" ("deposit_amount", "id")')
    else:
        schema_editor.add_index(apps.get_model("agreements", "UsageAgreement"), INDEX)


def index_drop(apps, schema_editor):
    schema_editor.remove_index(apps.get_model("agreements", "UsageAgreement"), INDEX)


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [
        ("agreements", "0045_agreement_completion_code"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddIndex(model_name="usageagreement", index=INDEX)],
            database_operations=[migrations.RunPython(index_create, index_drop)],
        ),
    ]
