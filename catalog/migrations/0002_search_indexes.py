"""PostgreSQL search indexes: GIN over the weighted tsvector, trigram GIN over names for fuzzy matches, and the
upper-cased capability name that the case-insensitive `capability` filter compares (without it, a capability no
service has meant walking every registered service: 175 ms at 100,000 services instead of 0.1 ms).

Only on PostgreSQL; the embedded SQLite default searches without them.
"""

from django.db import migrations

from marketplace.migration_operations import PostgreSQLOnlySQL

CREATE = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX IF NOT EXISTS service_search_vector_gin ON catalog_service USING gin (search_vector)",
    "CREATE INDEX IF NOT EXISTS service_name_trgm_gin ON catalog_service USING gin (name gin_trgm_ops)",
    # The very expression Django writes for `capability_name__iexact`, so the planner can use it.
    "CREATE INDEX IF NOT EXISTS service_capability_upper_idx ON catalog_service (upper(capability_name::text))",
]
DROP = [
    "DROP INDEX IF EXISTS service_capability_upper_idx",
    "DROP INDEX IF EXISTS service_name_trgm_gin",
    "DROP INDEX IF EXISTS service_search_vector_gin",
]


class Migration(migrations.Migration):
    dependencies = [("catalog", "0001_initial")]

    operations = [PostgreSQLOnlySQL(CREATE, DROP)]
