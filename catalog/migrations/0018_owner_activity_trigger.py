"""The database keeps `Agent.owner_is_active` (migration 0017) in step with the owner's is_active, whatever writes
either row: a receiver of the user's save copied it before, so a set-based `update(is_active=False)` of users (a
shell, a script, a bulk deactivation) left the owner's agents selling until the owner was saved again; a save of an
agent read before its owner was deactivated wrote the old copy back; an agent moved to another owner by an update
kept its old owner's.

- An update of a user's is_active that changes it copies it onto the user's agents (the sellers' trigger of 0011 then
  takes their services out of the postings, or puts them back).
- An agent inserted, or updated naming its owner or the copy (a save writes every column), takes its owner's
  is_active, read from the owner's row; one whose owner is not there yet (a deferred foreign key) keeps its own.

On PostgreSQL, a row trigger on the users (only for the rows whose is_active changes: a login's last_login fires
nothing) and a BEFORE row trigger on the agents; on SQLite (`make run`) the same as AFTER triggers, whose inner update
does not fire them again (SQLite's recursive triggers are off, and it writes only a copy that differs). Read once,
at the agent's write: an owner reassigned in one transaction while, in another, the owner is deactivated may keep
the old value until one of the two rows is written again (an operator's edit of an agent in the admin)."""

from django.conf import settings
from django.db import migrations


def _tables(apps) -> tuple[str, str]:
    return apps.get_model(settings.AUTH_USER_MODEL)._meta.db_table, apps.get_model("catalog", "Agent")._meta.db_table


def _postgresql(users: str, agents: str) -> list[str]:
    return [
        f"""
        CREATE FUNCTION catalog_agents_owner_activity_on_owner() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE {agents} SET owner_is_active = NEW.is_active
            WHERE owner_id = NEW.id AND owner_is_active IS DISTINCT FROM NEW.is_active;
            RETURN NULL;
        END $$
        """,
        f"""
        CREATE TRIGGER catalog_agents_owner_activity AFTER UPDATE OF is_active ON {users} FOR EACH ROW
            WHEN (OLD.is_active IS DISTINCT FROM NEW.is_active)
            EXECUTE FUNCTION catalog_agents_owner_activity_on_owner()
        """,
        f"""
        CREATE FUNCTION catalog_agent_owner_activity_copy() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.owner_is_active := COALESCE((SELECT is_active FROM {users} WHERE id = NEW.owner_id),
                                            NEW.owner_is_active);
            RETURN NEW;
        END $$
        """,
        f"""
        CREATE TRIGGER catalog_agent_owner_activity_copy BEFORE INSERT OR UPDATE OF owner_id, owner_is_active
            ON {agents} FOR EACH ROW EXECUTE FUNCTION catalog_agent_owner_activity_copy()
        """,
    ]


def _sqlite(users: str, agents: str) -> list[str]:
    owners = f"COALESCE((SELECT is_active FROM {users} WHERE id = NEW.owner_id), NEW.owner_is_active)"
    return [
        f"""
        CREATE TRIGGER catalog_agents_owner_activity AFTER UPDATE OF is_active ON {users} FOR EACH ROW
            WHEN OLD.is_active IS NOT NEW.is_active
        BEGIN
            UPDATE {agents} SET owner_is_active = NEW.is_active
            WHERE owner_id = NEW.id AND owner_is_active IS NOT NEW.is_active;
        END
        """,
        f"""
        CREATE TRIGGER catalog_agent_owner_activity_insert AFTER INSERT ON {agents} FOR EACH ROW
        BEGIN
            UPDATE {agents} SET owner_is_active = {owners} WHERE id = NEW.id AND owner_is_active IS NOT {owners};
        END
        """,
        f"""
        CREATE TRIGGER catalog_agent_owner_activity_update AFTER UPDATE OF owner_id, owner_is_active ON {agents}
            FOR EACH ROW
        BEGIN
            UPDATE {agents} SET owner_is_active = {owners} WHERE id = NEW.id AND owner_is_active IS NOT {owners};
        END
        """,
    ]


DROP = {
    "postgresql": lambda users, agents: [
        f"DROP TRIGGER catalog_agent_owner_activity_copy ON {agents}",
        "DROP FUNCTION catalog_agent_owner_activity_copy()",
        f"DROP TRIGGER catalog_agents_owner_activity ON {users}",
        "DROP FUNCTION catalog_agents_owner_activity_on_owner()",
    ],
    "sqlite": lambda users, agents: [
        "DROP TRIGGER catalog_agent_owner_activity_update",
        "DROP TRIGGER catalog_agent_owner_activity_insert",
        "DROP TRIGGER catalog_agents_owner_activity",
    ],
}
CREATE = {"postgresql": _postgresql, "sqlite": _sqlite}


def _run(statements: dict, apps, schema_editor) -> None:
    vendor = schema_editor.connection.vendor
    if vendor not in statements:
        raise NotImplementedError(f"Agent.owner_is_active is kept by triggers on PostgreSQL and SQLite, not {vendor}.")
    for statement in statements[vendor](*_tables(apps)):
        schema_editor.execute(statement)


def create(apps, schema_editor) -> None:
    _run(CREATE, apps, schema_editor)
    # Whatever a set-based update left behind before this migration.
    Agent = apps.get_model("catalog", "Agent")
    for active in (True, False):
        Agent.objects.filter(owner__is_active=active).exclude(owner_is_active=active).update(owner_is_active=active)


def drop(apps, schema_editor) -> None:
    _run(DROP, apps, schema_editor)


class Migration(migrations.Migration):

    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
        # After every auth migration: SQLite remakes auth_user for an altered field, which a trigger naming it breaks
        # (with a later app's migration added, the plan ran auth's after this one: "no such table: main.auth_user").
        ('auth', '0012_alter_user_first_name_max_length'),
        ('catalog', '0017_agent_owner_is_active'),
    ]

    operations = [
        migrations.RunPython(create, drop),
    ]
