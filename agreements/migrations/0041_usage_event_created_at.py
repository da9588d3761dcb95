from django.db import migrations, models

INDEX = models.Index(fields=["created_at"], name="usage_event_created_at")


def index_create(apps, schema_editor):
    """Built without blocking charges on PostgreSQL: a plain CREATE INDEX holds off every insert into the largest
    table until it is built."""
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute('CREATE INDEX CONCURRENTLY IF NOT EXISTS "usage_event_created_at" '
                              'ON "agreements_usageevent" ("created_at")')
    else:
        schema_editor.add_index(apps.get_model("agreements", "UsageEvent"), INDEX)


def index_drop(apps, schema_editor):
    schema_editor.remove_index(apps.get_model("agreements", "UsageEvent"), INDEX)


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [
        ("agreements", "0040_proposed_amount_fill"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddIndex(model_name="usageevent", index=INDEX)],
            database_operations=[migrations.RunPython(index_create, index_drop)],
        ),
    ]
