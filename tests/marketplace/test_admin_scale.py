"""The operators' admin with many rows: each page asks the database as many statements with many rows as with few
(no statement per listed row), and no page lists every row of a big table in a form's select.
bench/admin_pages.py measures the same pages with 100,000 rows of each big table."""

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext

from bench.admin_pages import pages, rows_added
from catalog.models import Agent

pytestmark = pytest.mark.django_db

FEW, MANY = 3, 40


def _statements(client, path: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    return len(queries.captured_queries)


def test_each_admin_page_asks_as_many_statements_with_many_rows_as_with_few(operator, django_assert_max_num_queries):
    owner = get_user_model().objects.create(username="rows-owner")
    rows_added(FEW, owner=owner)
    with_few = {name: _statements(operator, path) for name, path in pages()}

    rows_added(MANY, owner=owner, first=FEW)

    for name, path in pages():
        with django_assert_max_num_queries(with_few[name], info=name):
            assert operator.get(path).status_code == 200, name


def test_the_policy_add_page_lists_no_agent_in_a_select(operator):
    """A policy's agent was a select of every agent: with 20,000 agents the page took 6 s and megabytes to draw. It
    is the agent's id, with Django's lookup (raw_id_fields)."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))

    page = operator.get("/admin/policies/policy/add/").content.decode()

    assert 'name="agent"' in page and '<select name="agent"' not in page
    assert not any(str(agent.pk) in page for agent in Agent.objects.all())
