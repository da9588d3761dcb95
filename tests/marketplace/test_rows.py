"""marketplace.rows: instances read by statements built once per process are what the ORM gives for the same
columns, whatever order the columns are named in."""

import pytest
from django.db import connection

from catalog.models import Agent
from marketplace.postgresql import prepared_cursor
from marketplace.rows import model_columns
from tests.catalog.factories import AgentFactory

pytestmark = pytest.mark.django_db


def test_columns_named_out_of_the_models_order_give_each_field_its_own_value():
    agent = AgentFactory(handle="rows-agent", display_name="Rows agent")
    # Model.from_db places a subset's values by the model's field order, not by the order they were named in.
    columns = model_columns(Agent, "a", ("wallet_address", "display_name", "id", "handle"))
    quote = connection.ops.quote_name
    with prepared_cursor() as cursor:
        cursor.execute(f"SELECT {columns.select} FROM {quote(Agent._meta.db_table)} a "  # noqa: S608
                       f"WHERE a.{quote(Agent._meta.pk.column)} = %s",
                       [Agent._meta.pk.get_db_prep_value(agent.pk, connection)])
        read = columns.instance(iter(cursor.fetchone()))
    assert (read.pk, read.handle, read.display_name, read.wallet_address) == (
        agent.pk, "rows-agent", "Rows agent", agent.wallet_address)
    assert "owner_id" in read.get_deferred_fields()
