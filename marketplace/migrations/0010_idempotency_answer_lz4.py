"""Stored answers compressed with lz4 instead of pglz on PostgreSQL: the ~45 kB answer to a batch of usage events is
stored while the agreement's row lock is held (bench/usage.py), and pglz compressing it took about a quarter of the
statement. Only new values are affected; a server built without lz4 keeps pglz."""

from django.db import DatabaseError, migrations, transaction


def answers_lz4(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    table = schema_editor.quote_name(apps.get_model("marketplace", "IdempotencyRecord")._meta.db_table)
    try:
        with transaction.atomic(using=schema_editor.connection.alias):
            schema_editor.execute(f"ALTER TABLE {table} ALTER COLUMN response_body SET COMPRESSION lz4")
    except DatabaseError:  # compression method lz4 not supported: PostgreSQL built without it
        pass


def answers_default_compression(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        table = schema_editor.quote_name(apps.get_model("marketplace", "IdempotencyRecord")._meta.db_table)
        schema_editor.execute(f"ALTER TABLE {table} ALTER COLUMN response_body SET COMPRESSION DEFAULT")


class Migration(migrations.Migration):

    dependencies = [
        ("marketplace", "0009_dashboard_permission"),
    ]

    operations = [
        migrations.RunPython(answers_lz4, answers_default_compression),
    ]
