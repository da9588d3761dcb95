"""The operators' searches of agents and skills (catalog.admin): Django's `icontains` compared each term with every
search column of every agent (through a join to their owners) and every skill. Each column is now asked on its own
(the owners first, their keys then), through the very expression Django writes for `icontains`
(`UPPER(col::text) LIKE UPPER('%term%')`) in a trigram index; an agent's wallet through a b-tree. The skills' list
reads its page in its order (name, then the key) from an index.

The trigram indexes on PostgreSQL only (pg_trgm: migration 0002); the embedded SQLite default searches without them.
"""

from django.db import migrations, models

from marketplace.migration_operations import PostgreSQLOnlySQL

TRIGRAM_INDEXES = {  # name: (table, column)
    "agent_handle_upper_trgm": ("catalog_agent", "handle"),
    "agent_display_name_upper_trgm": ("catalog_agent", "display_name"),
    "skill_name_upper_trgm": ("catalog_skill", "name"),
    "skill_description_upper_trgm": ("catalog_skill", "description"),
    # The agents' owners, looked up first by the agents' search.
    "user_username_upper_trgm": ("auth_user", "username"),
    "user_email_upper_trgm": ("auth_user", "email"),
}


class Migration(migrations.Migration):

    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("catalog", "0021_service_availability_queued_at"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="agent",
            index=models.Index(fields=["wallet_address"], name="agent_wallet_idx"),
        ),
        migrations.AddIndex(
            model_name="skill",
            index=models.Index(fields=["name", "-id"], name="skill_listing_idx"),
        ),
        PostgreSQLOnlySQL(
            ["CREATE EXTENSION IF NOT EXISTS pg_trgm"]
            + [f"CREATE INDEX IF NOT EXISTS {name} ON {table} USING gin (upper({column}::text) gin_trgm_ops)"
               for name, (table, column) in TRIGRAM_INDEXES.items()],
            [f"DROP INDEX IF EXISTS {name}" for name in TRIGRAM_INDEXES],
        ),
    ]
