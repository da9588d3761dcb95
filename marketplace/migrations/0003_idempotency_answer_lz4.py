from django.db import migrations

TABLE, COLUMN = "marketplace_idempotencyrecord", "response_body"


def _lz4_available(schema_editor) -> bool:
    if schema_editor.connection.vendor != "postgresql":
        return False
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
                       "AND 'lz4' = ANY(enumvals)")
        return cursor.fetchone() is not None


def compress_with_lz4(apps, schema_editor):
    if _lz4_available(schema_editor):
        quote = schema_editor.quote_name
        schema_editor.execute(f"ALTER TABLE {quote(TABLE)} ALTER COLUMN {quote(COLUMN)} SET COMPRESSION lz4")


def compress_by_default(apps, schema_editor):
    if _lz4_available(schema_editor):
        quote = schema_editor.quote_name
        schema_editor.execute(f"ALTER TABLE {quote(TABLE)} ALTER COLUMN {quote(COLUMN)} SET COMPRESSION DEFAULT")


class Migration(migrations.Migration):
    """Stored answers are compressed with lz4 where PostgreSQL has it (14+, built with lz4): the answer to a batch
    of 100 usage events is ~45 kB, and PostgreSQL's default pglz spent about twice lz4's CPU compressing it (a
    stored answer is written once per request and read only on a replay). Existing values stay as they are."""

    dependencies = [
        ("marketplace", "0002_dead_letters"),
    ]

    operations = [migrations.RunPython(compress_with_lz4, compress_by_default)]
