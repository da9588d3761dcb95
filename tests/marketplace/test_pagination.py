"""Keyset pagination (marketplace.pagination): a later page starts at its cursor in an index on the first sort field
instead of filtering every row before the cursor (what made deep pages of the catalog cost more than the first)."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.agreements.helpers import propose
from tests.catalog.factories import register_service
from tests.catalog.test_search import listing, search

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


def _plan(statement: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # a few rows are cheapest read whole: ask for the index
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        cursor.execute("EXPLAIN " + statement)
        return "\n".join(row[0] for row in cursor.fetchall())


@pytest.mark.parametrize(("order_by", "bound"), [("newest", "created_at <="), ("price", "unit_price >=")])
def test_a_later_page_starts_at_its_cursor_in_the_index(seller, buyer_api, order_by, bound):
    for i in range(3):
        listing(seller, f"Service {i}", price=10_000 * (i + 1))
    cursor = search(buyer_api, order_by=order_by, limit=1)["next_cursor"]

    with CaptureQueriesContext(connection) as captured:
        assert len(search(buyer_api, order_by=order_by, limit=1, cursor=cursor)["results"]) == 1
    statement = next(q["sql"] for q in captured.captured_queries
                     if 'FROM "catalog_service"' in q["sql"] and "ORDER BY" in q["sql"])

    index_conditions = [line for line in _plan(statement).splitlines() if "Index Cond" in line]
    assert any(bound in line for line in index_conditions), index_conditions


@pytest.mark.parametrize("role", ["buyer", "seller", None])
def test_a_page_of_an_agents_agreements_is_read_in_an_index_without_sorting_them_all(
        role, buyer, buyer_api, seller_api, seller):
    """A page read every agreement the agent ever had (in the role asked, or in both) and sorted them: a seller's
    listing, which every buyer's proposals grow, cost a sort of all of them on each page. Without a role, "buyer or
    seller" is in no index's order: each role's page is read in its own and the two merged."""
    service = register_service(seller)
    for _ in range(3):
        propose(buyer_api, service)
    api = seller_api if role == "seller" else buyer_api
    query = {"limit": 1} if role is None else {"role": role, "limit": 1}
    first = api.get("/usage-agreements", query).json()
    with CaptureQueriesContext(connection) as captured:
        second = api.get("/usage-agreements", {**query, "cursor": first["next_cursor"]}).json()
    statements = [q["sql"] for q in captured.captured_queries  # read before the next request clears them
                  if 'FROM "agreements_usageagreement"' in q["sql"] and "ORDER BY" in q["sql"]]
    third = api.get("/usage-agreements", {**query, "cursor": second["next_cursor"]}).json()
    assert third["next_cursor"] is None
    listed = [page["results"][0]["id"] for page in (first, second, third)]
    newest_first = api.get("/usage-agreements", {} if role is None else {"role": role}).json()["results"]
    assert listed == [agreement["id"] for agreement in newest_first]

    assert statements
    for statement in statements:
        plan = _plan(statement)
        assert "Sort" not in plan, plan
        assert any("created_at <=" in line for line in plan.splitlines() if "Index Cond" in line), plan
