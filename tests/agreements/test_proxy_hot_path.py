"""The metered proxy's hot path (issue #18): the caller's key and the agreement's terms are read from the database
at most once per CREDENTIAL_CACHE_SECONDS per process, and what changes still takes effect: a revocation within
that second, a status change at once (the reservation checks the row itself)."""

import json
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agreements.models import UsageAgreement
from catalog.models import ApiKey
from tests.conftest import error_code

pytestmark = [pytest.mark.chain, pytest.mark.django_db]


def call(parties, path="work"):
    return parties.buyer_api.get(f"/metered-proxy/{parties.agreement_id}/{path}")


def tables_read(queries) -> set[str]:
    return {table for query in queries for table in ("catalog_apikey", "catalog_service")
            if f'"{table}"' in query["sql"] and query["sql"].lstrip().upper().startswith("SELECT")}


def test_a_second_call_reads_neither_the_key_nor_the_agreements_terms(active, http_server):
    http_server.responses.extend([(200, {"n": 1}), (200, {"n": 2})])
    with CaptureQueriesContext(connection) as first:
        assert call(active).status_code == 200
    with CaptureQueriesContext(connection) as second:
        response = call(active)
    assert response.status_code == 200 and json.loads(b"".join(response.streaming_content)) == {"n": 2}
    assert tables_read(first.captured_queries) == {"catalog_apikey", "catalog_service"}
    assert tables_read(second.captured_queries) == set()
    assert response["X-Usage-Seq"] == "2"  # still charged, in order


def test_a_revoked_key_is_refused_within_a_second(active, http_server, settings):
    http_server.responses.extend([(200, {}), (200, {})])
    assert call(active).status_code == 200
    ApiKey.objects.filter(prefix=active.buyer_api.secret.split("_")[1]).update(revoked_at=timezone.now())
    time.sleep(settings.CREDENTIAL_CACHE_SECONDS + 0.1)
    response = call(active)
    assert response.status_code == 401 and error_code(response) == "credentials_revoked"
    assert len(http_server.requests) == 1


def test_an_agreement_that_stops_being_active_is_refused_at_once(active, http_server):
    http_server.responses.append((200, {}))
    assert call(active).status_code == 200
    UsageAgreement.objects.filter(pk=active.agreement_id).update(status="in_challenge")  # cached terms, new status
    response = call(active)
    assert response.status_code == 409 and error_code(response) == "agreement_not_active"
    assert len(http_server.requests) == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)  # outside a test's transaction: the charge's own transactions
def test_a_charge_draws_no_warning_from_the_database(active_outside_transaction, http_server):
    """PostgreSQL warned "there is no transaction in progress" at every charge (a COMMIT that no BEGIN opened), and
    wrote that warning to its log and sent it to the server, once per proxied call."""
    http_server.responses.extend([(200, {}), (200, {})])
    connection.ensure_connection()
    warnings = []
    connection.connection.add_notice_handler(lambda notice: warnings.append(notice.message_primary))

    first, second = call(active_outside_transaction), call(active_outside_transaction)  # two round trips, then one

    assert (first.status_code, first["X-Usage-Seq"], second.status_code, second["X-Usage-Seq"]) == (200, "1", 200, "2")
    assert warnings == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)  # outside a test's transaction: the charge's own transactions
def test_a_charge_runs_statements_prepared_on_the_server(active_outside_transaction, http_server):
    """The charge's statements were sent as text with their values written in, so PostgreSQL parsed and planned
    both of them again at every call (a third of its CPU per charge); they are prepared once per connection."""
    http_server.responses.extend([(200, {}), (200, {})])

    assert call(active_outside_transaction).status_code == call(active_outside_transaction).status_code == 200

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [statement for (statement,) in cursor.fetchall()]
    assert any("FOR UPDATE" in statement for statement in prepared)  # closing the intent, locking the row
    assert any("json_to_recordset" in statement for statement in prepared)  # writing the event and the counters
    assert any("EXISTS (SELECT FROM closed)" in statement for statement in prepared)  # the charge on a known head


@pytest.mark.postgres
def test_the_agreements_terms_are_read_by_one_statement_prepared_on_the_server(active, http_server):
    """Once a second per agreement in every process: the ORM's query took 0.72 ms of CPU, this statement 0.16 ms
    (bench/HISTORY.md, fifteenth session)."""
    http_server.responses.append((200, {"n": 1}))
    with CaptureQueriesContext(connection) as captured:
        assert call(active).status_code == 200
    [terms] = [query["sql"] for query in captured.captured_queries if '"catalog_service"' in query["sql"]]
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
                       ['%FROM "agreements_usageagreement" a JOIN "catalog_service" v%'])
        assert cursor.fetchone() == (1,)
    assert terms.count("SELECT") == 1
