"""Migration operations the apps share."""

from django.db import migrations


class PostgreSQLOnlySQL(migrations.RunSQL):
    """RunSQL on PostgreSQL only: the embedded SQLite default (`make run`) has no such indexes, extensions or
    triggers, and its searches take their own path (catalog.selectors)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)


def index_added_concurrently(*, app_label: str, model_name: str, index) -> migrations.SeparateDatabaseAndState:
    """Add `index` without blocking writes on PostgreSQL (CREATE INDEX CONCURRENTLY: a plain CREATE INDEX holds off
    every insert into the table until it is built); a plain one on SQLite. Its migration sets `atomic = False`
    (CONCURRENTLY runs outside a transaction)."""

    def create(apps, schema_editor):
        model = apps.get_model(app_label, model_name)
        if schema_editor.connection.vendor == "postgresql":
            columns = ", ".join(f'"{model._meta.get_field(name).column}"' for name in index.fields)
            schema_editor.execute(f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{index.name}" '
                                  f'ON "{model._meta.db_table}" ({columns})')
        else:
            schema_editor.add_index(model, index)

    def drop(apps, schema_editor):
        schema_editor.remove_index(apps.get_model(app_label, model_name), index)

    return migrations.SeparateDatabaseAndState(
        state_operations=[migrations.AddIndex(model_name=model_name, index=index)],
        database_operations=[migrations.RunPython(create, drop)])
