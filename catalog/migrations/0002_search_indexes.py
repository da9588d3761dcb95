"""PostgreSQL search indexes: GIN over the weighted tsvector, trigram GIN over names for fuzzy matches.

Only on PostgreSQL; the embedded SQLite default searches without them.
"""

from django.db import migrations

CREATE = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX IF NOT EXISTS service_search_vector_gin ON catalog_service USING gin (search_vector)",
    "CREATE INDEX IF NOT EXISTS service_name_trgm_gin ON catalog_service USING gin (name gin_trgm_ops)",
]
DROP = [
    "DROP INDEX IF EXISTS service_name_trgm_gin",
    "DROP INDEX IF EXISTS service_search_vector_gin",
]


def _run(statements):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return
        for sql in statements:
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):
    dependencies = [("catalog", "0001_initial")]

    operations = [migrations.RunPython(_run(CREATE), _run(DROP))]
