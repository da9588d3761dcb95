"""The postings of the visible services (catalog/migrations/0011_service_postings.py), each with its word's score in
the service (0012), that plain text searches read (catalog.selectors._postings_matching): the same results and
relevance as the search vectors' GIN index, kept in step, as the visible names the typo-tolerant search reads, with
every write that changes what they hold or whether a service is visible."""

import importlib
import re
from datetime import timedelta
from random import Random

import orjson
import pytest
from psycopg.errors import DivisionByZero
from psycopg.pq import TransactionStatus
from django.db import DataError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from catalog import selectors, services
from catalog.models import SERVICE_POSTINGS_TABLE, VISIBLE_SERVICE_NAMES_TABLE, Agent, Service
from catalog.selectors import OffsetPage, ServiceSearch, service_search
from catalog.services import search_vector_expression
from tests.catalog.factories import AgentFactory, register_service

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

WORDS = ["invoice", "invoices", "invoicing", "extraction", "extract", "extractor", "legal", "translate", "translator",
         "summarize", "meeting", "notes", "fast", "data", "sql", "code", "review", "image", "speech", "e-commerce",
         "pdf-to-text", "x.com", "3.5", "it's", "c:\\dir", "the", "and", "naïve", "café"]
QUERIES = ["invoice", "invoice extraction", "invoices extracting", "legal translator", "summarize meeting notes",
           "invoice invoice", "the invoice", "Invoice, extraction!", "fast data sql code", "x.com", "3.5", "naïve café",
           "it's", "c:\\dir", "(invoice) & extraction", "translation:*", "e-commerce invoice", "pdf-to-text",
           '"invoice extraction"', "invoice -extraction", "invoice or legal", "the and", "zzz", "invoice zzz",
           "a b c d e f g h j k invoice"]


def _seed(count: int, *, rng: Random) -> list[Agent]:
    """`count` services of random words in their name, keywords and description (words repeat, so lexemes have
    several positions and weights), half of them created at one of a few instants (ties on relevance and time),
    some deregistered, unavailable or of an inactive seller."""
    sellers = [AgentFactory(is_seller=True), AgentFactory(is_seller=True), AgentFactory(is_seller=True, is_active=False)]
    now = timezone.now()

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    created = Service.objects.bulk_create([
        Service(seller=rng.choice(sellers), name=words(1, 4), description=words(0, 40), keywords=words(0, 6),
                capability_name="general", capability_version="1.0.0", pricing_type="per_call",
                unit_price=rng.choice([1_000, 2_000, 3_000]), upstream_base_url="https://example.com",
                state=rng.choices(["registered", "deregistered"], [9, 1])[0],
                availability=rng.choices(["unknown", "available", "unavailable"], [6, 3, 1])[0])
        for _ in range(count)
    ])
    Service.objects.update(search_vector=search_vector_expression())
    for service in created:
        if rng.random() < 0.5:
            service.created_at = now - timedelta(minutes=rng.randrange(3))
        else:
            service.created_at = now - timedelta(seconds=rng.randrange(10**6))
    Service.objects.bulk_update(created, ["created_at"])
    return sellers


_ORDER = {
    "relevance": "2 DESC, s.created_at DESC, s.id",
    "price": "s.unit_price, s.created_at DESC, s.id",
    "newest": "s.created_at DESC, s.id",
}


def _reference(text: str, order_by: str) -> list[tuple]:
    """(id, relevance) of every visible service matching `text`, as the search vectors' GIN index answers it: the
    relevance is the mean of ts_rank for each word the query does not exclude (its `querytree`), summed in order."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT querytree(websearch_to_tsquery('english', %s))", [text])
        lexemes = list(dict.fromkeys(re.findall(r"'(?:[^'\\]|''|\\.)*'", cursor.fetchone()[0])))
        cursor.execute(
            "SELECT s.id, coalesce((SELECT sum(ts_rank(s.search_vector, word.lexeme::tsquery)::double precision "
            "                               ORDER BY word.n) / count(*) "
            "                      FROM unnest(%s::text[]) WITH ORDINALITY AS word (lexeme, n)), 0.0) "
            "FROM catalog_service s JOIN catalog_agent a ON a.id = s.seller_id "
            "WHERE s.state = 'registered' AND a.is_active AND s.availability <> 'unavailable' "
            f"AND s.search_vector @@ websearch_to_tsquery('english', %s) ORDER BY {_ORDER[order_by]}", [lexemes, text])
        return [(str(service_id), rank) for service_id, rank in cursor.fetchall()]


def _walk(text: str, order_by: str, *, limit: int, **filters) -> list[tuple]:
    found, cursor = [], None
    for _ in range(1000):
        rows, cursor = service_search(search=ServiceSearch(text=text, order_by=order_by, **filters), cursor=cursor,
                                      limit=limit)
        found += _ids_and_relevance(rows)
        if cursor is None:
            return found
    raise AssertionError("pagination did not end")


def _ids_and_relevance(results: list) -> list[tuple]:
    """The id and relevance of each result, as the API writes them (service_search's results are the API's JSON)."""
    return [(result["id"], result["relevance"]) for result in orjson.loads(orjson.dumps(results))]


def _read_postings(text: str) -> bool:
    """Whether the first page of `text` is chosen from the postings."""
    with CaptureQueriesContext(connection) as captured:
        service_search(search=ServiceSearch(text=text), cursor=None, limit=5)
    return any(f'FROM "{SERVICE_POSTINGS_TABLE}"' in q["sql"] and "ORDER BY" in q["sql"]
               for q in captured.captured_queries)


def test_plain_text_results_are_the_gin_indexs_in_every_order_page_by_page():
    """Every page, order and relevance value of a text search from the postings is the GIN index's; a text with
    websearch syntax (a phrase, an exclusion, `or`) or many words keeps to the GIN index."""
    rng = Random(18)
    _seed(400, rng=rng)
    queries = [*QUERIES, *(" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(30))]
    plain = 0
    for text in queries:
        if not _reference(text, "relevance"):
            continue  # nothing exact: the typo-tolerant fallback's (tests/catalog/test_search.py)
        for order_by in _ORDER:
            expected = _reference(text, order_by)
            assert _walk(text, order_by, limit=7) == expected, (text, order_by)
        page = service_search(search=ServiceSearch(text=text), cursor=None, limit=7, offset=7)
        assert isinstance(page, OffsetPage)
        assert _ids_and_relevance(page.results) == _reference(text, "relevance")[7:14]
        assert page.total == len(expected)
        plain += _read_postings(text)
    assert plain >= 30  # most of them were answered from the postings
    for text in ['"invoice extraction"', "invoice -extraction", "invoice or legal", "e-commerce invoice",
                 "a b c d e f g h j k invoice"]:
        assert not _read_postings(text), text


def test_a_search_page_is_a_statement_prepared_on_the_server_and_kept_for_other_words():
    """A page's statement (several kB of SQL, most of it writing the results as JSON) was sent as text with its values
    written in, so PostgreSQL parsed and planned it again at every search: 15-20% of its CPU per search at 100,000
    services (bench/HISTORY.md, twenty-first session). It is prepared once per connection, and whatever plan
    PostgreSQL keeps for it after five searches (one made for no word in particular, when that one is no dearer)
    still answers every word exactly."""
    _seed(300, rng=Random(21))
    texts = ["invoice", "legal", "meeting", "data", "code", "review", "image", "speech", "notes", "fast"]
    for text in texts:  # one word each: one statement, run first by PostgreSQL's custom plans, then by its own
        for order_by in _ORDER:
            assert _walk(text, order_by, limit=7) == _reference(text, order_by), (text, order_by)
    with connection.cursor() as cursor:
        cursor.execute("SELECT generic_plans + custom_plans FROM pg_prepared_statements WHERE statement LIKE %s "
                       "AND statement NOT LIKE %s", [f'%FROM "{SERVICE_POSTINGS_TABLE}" p0 WHERE p0.lexeme = $1 %',
                                                     "% OR %"])  # the first pages by relevance, not the cursors'
        runs = [count for (count,) in cursor.fetchall()]
    assert runs and max(runs) >= len(texts)


@pytest.mark.django_db(transaction=True)  # outside a test's transaction: the page's own transaction sets the mode
def test_a_text_page_runs_on_the_generic_plan_from_its_first_search():
    """Planned for its values, a three-word page probed the third word's postings once per match of the first two
    (1,396 probes) instead of merging the three lists: 4.0 ms of PostgreSQL's CPU instead of 2.05 at 100,000
    services (bench/HISTORY.md, twenty-first session). The postings' pages run on the plan PostgreSQL makes for no
    values in particular, which gives every word's pages as the GIN index does, and leaves the connection's mode as
    it was."""
    _seed(300, rng=Random(7))
    texts = ["invoice meeting notes", "legal data code", "fast review image", "speech notes sql"]
    for text in texts:  # three words each: one statement for the first pages, one for the later ones
        for order_by in _ORDER:
            assert _walk(text, order_by, limit=7) == _reference(text, order_by), (text, order_by)
    with connection.cursor() as cursor:
        cursor.execute("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE %s "
                       "AND statement LIKE %s",  # the pages (which write the results), not the probes
                       [f'%FROM "{SERVICE_POSTINGS_TABLE}" p0, "{SERVICE_POSTINGS_TABLE}" p1, %', '%"seller":%'])
        plans = cursor.fetchall()
        cursor.execute("SHOW plan_cache_mode")
        assert cursor.fetchone() == ("auto",)
    assert plans and all(generic > 0 and custom == 0 for generic, custom in plans), plans


@pytest.mark.django_db(transaction=True)
def test_a_page_that_fails_on_the_generic_plan_leaves_the_connection_as_it_was():
    with pytest.raises(DataError) as raised:  # Django's, wherever psycopg raised it (test_transaction_in_pipelines.py)
        selectors._fetch_on_generic_plan("SELECT 1 / %s", [0])
    assert isinstance(raised.value.__cause__, DivisionByZero)
    assert connection.connection.info.transaction_status == TransactionStatus.IDLE  # rolled back
    with connection.cursor() as cursor:
        cursor.execute("SHOW plan_cache_mode")
        assert cursor.fetchone() == ("auto",)
    assert selectors._fetch_on_generic_plan("SELECT %s::int + 1", [1]) == [(2,)]


def test_a_filtered_page_is_planned_for_its_values_at_every_search():
    """Prepared, a filtered page's statement could run on the plan PostgreSQL makes for no values in particular,
    which it may keep for a prepared statement after five runs: at 100,000 services that plan read a page of
    services by price with two tags in 3.8 s instead of 2.4 ms (bench/HISTORY.md, twenty-first session). Only the
    postings' and the visible names' statements, whose plan is the same for any values, are prepared."""
    _seed(200, rng=Random(3))
    cheap = {"max_unit_price": 2_000}
    for _ in range(6):  # past PostgreSQL's five custom plans
        for text, order_by in [("", "price"), ("", "newest"), ("invoice", "relevance"), ("translater", "relevance")]:
            search = ServiceSearch(text=text, order_by=order_by, **cheap)
            results, cursor = service_search(search=search, cursor=None, limit=7)
            assert results and cursor, (text, order_by)
            service_search(search=search, cursor=cursor, limit=7)  # a page after a cursor
            assert service_search(search=search, cursor=None, limit=7, offset=7).total > 7
        _walk("invoice", "relevance", limit=7)  # the postings: prepared
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [statement for (statement,) in cursor.fetchall()]
    assert any(f'"{SERVICE_POSTINGS_TABLE}"' in statement for statement in prepared)
    assert not [statement for statement in prepared if '"catalog_service" s JOIN "catalog_agent" a' in statement]


def test_misspelt_text_finds_from_the_visible_names_what_it_finds_among_the_services():
    """Without filters the typo-tolerant fallback reads the services bearing the names it found from the visible
    names; with a filter that leaves nothing out, from the services: the same pages, in every order."""
    _seed(400, rng=Random(5))
    everything = {"max_unit_price": 10**30}
    walked = 0
    for text in ["invoise extracton", "translater", "sumarize meting", "reveiw", "fsat dta", "invoise"]:
        for order_by in _ORDER:
            found = _walk(text, order_by, limit=7)
            assert found == _walk(text, order_by, limit=7, **everything), (text, order_by)
            walked += len(found)
    assert walked > 400


# ts_rank's weights of an occurrence by its label (D, no label, counts least).
_WEIGHTS = {"A": 1.0, "B": 0.4, "C": 0.2}


def _score_of_one_word(weights: list[float]) -> float:
    """ts_rank of a vector for one word (PostgreSQL's calc_rank_or) from the weights of its occurrences in order: the
    first heaviest counts whole, every other by 1/i² of its place i, over π²/6 (the sum of 1/i²)."""
    heaviest = max(range(len(weights)), key=weights.__getitem__)
    spread = sum(weight / (place + 1) ** 2 for place, weight in enumerate(weights))
    return (weights[heaviest] + spread - weights[heaviest] / (heaviest + 1) ** 2) / 1.64493406685


def _expected_postings() -> dict[tuple, float]:
    """(lexeme, service id, created_at, unit_price) -> score of the postings every visible service should have, read
    from the text of its search vector."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT s.id, s.search_vector::text, s.created_at, s.unit_price FROM catalog_service s "
                       "JOIN catalog_agent a ON a.id = s.seller_id WHERE s.state = 'registered' AND a.is_active "
                       "AND s.availability <> 'unavailable'")
        rows = cursor.fetchall()
    expected = {}
    for service_id, vector, created_at, unit_price in rows:
        for entry in re.finditer(r"'((?:[^'\\]|''|\\.)*)':(\S+)", vector or ""):
            lexeme = re.sub(r"''|\\(.)", lambda escaped: escaped.group(1) or "'", entry.group(1))
            weights = [_WEIGHTS.get(position[-1], 0.1) for position in entry.group(2).split(",")]
            expected[lexeme, service_id, created_at, unit_price] = _score_of_one_word(weights)
    return expected


def _postings() -> dict[tuple, float]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT lexeme, service_id, created_at, unit_price, score FROM {SERVICE_POSTINGS_TABLE}")
        return {tuple(row[:4]): row[4] for row in cursor.fetchall()}


def _in_step() -> bool:
    """Whether the postings and the visible names are those of the services as they are now."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT name, service_id, created_at, unit_price FROM {VISIBLE_SERVICE_NAMES_TABLE}")
        names = set(cursor.fetchall())
        cursor.execute("SELECT s.name, s.id, s.created_at, s.unit_price FROM catalog_service s "
                       "JOIN catalog_agent a ON a.id = s.seller_id WHERE s.state = 'registered' AND a.is_active "
                       "AND s.availability <> 'unavailable'")
        expected_names = set(cursor.fetchall())
    postings, expected = _postings(), _expected_postings()
    return (names == expected_names and postings.keys() == expected.keys()
            and all(postings[key] == pytest.approx(score, rel=1e-6) for key, score in expected.items()))


def _found(text: str) -> set[str]:
    results, _ = service_search(search=ServiceSearch(text=text), cursor=None, limit=50)
    return {result["name"] for result in orjson.loads(orjson.dumps(results))}


def test_postings_follow_every_change_of_a_service_its_seller_or_its_state(seller):
    other_seller = AgentFactory(is_seller=True)
    translator = register_service(seller, name="Legal translator", description="Translates contracts.")
    extractor = register_service(other_seller, name="Invoice extractor", description="Reads invoices.")
    assert _in_step() and _found("legal") == {"Legal translator"}

    services.service_update(service=translator, actor=seller, data={
        "name": "Contract reviewer", "description": "Reviews agreements.",
        "pricing": {"type": "per_call", "unit_price_atomic": 5_000}})
    assert _in_step()
    assert _found("legal") == set() and _found("reviewer") == {"Contract reviewer"}

    services.service_availability_record(service_id=extractor.pk, available=False)
    assert _found("invoice") == set() and _in_step()
    services.service_availability_record(service_id=extractor.pk, available=True)
    assert _found("invoice") == {"Invoice extractor"} and _in_step()

    other_seller.is_active = False
    other_seller.save()  # as the admin saves it
    assert _found("invoice") == set() and _in_step()
    Agent.objects.filter(pk=other_seller.pk).update(is_active=True)
    assert _found("invoice") == {"Invoice extractor"} and _in_step()
    Agent.objects.filter(pk=other_seller.pk).update(display_name="Renamed")  # nothing to rewrite
    assert _in_step()

    Service.objects.filter(pk=extractor.pk).update(state="deregistered")
    assert _found("invoice") == set() and _in_step()
    Service.objects.filter(pk=extractor.pk).update(state="registered", created_at=timezone.now() - timedelta(days=1))
    assert _found("invoice") == {"Invoice extractor"} and _in_step()

    services.service_deregister(service=translator, actor=seller)
    assert _found("reviewer") == set() and _in_step()

    Service.objects.filter(pk=extractor.pk).delete()
    assert _postings() == {} and _in_step()
    register_service(seller, name="Speech transcriber")
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # TRUNCATE refuses a table with foreign key checks pending
        cursor.execute("TRUNCATE catalog_service CASCADE")  # as Django's flush empties the tables between tests
    assert _postings() == {} and _in_step()


def test_the_migration_writes_the_postings_of_the_services_already_there():
    _seed(200, rng=Random(3))
    assert _postings() and _in_step()
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {SERVICE_POSTINGS_TABLE}, {VISIBLE_SERVICE_NAMES_TABLE}")
        cursor.execute(importlib.import_module("catalog.migrations.0012_posting_scores").REWRITE_ALL)
    assert _postings() and _in_step()


def test_the_tag_migration_merges_a_styled_tag_into_its_normal_form_and_keeps_search_in_step():
    """Tags are kept in NFKC, case-folded (marketplace.tags); one stored before (`ｆｉｎａｎｃｅ`) is renamed, or merged
    into its normal form's tag, and the search data of the services bearing it rebuilt with it."""
    from django.apps import apps

    from catalog.models import Tag

    plain = register_service(AgentFactory(is_seller=True), tags=["finance"])
    styled = register_service(AgentFactory(is_seller=True), name="Ledger reader", tags=["nlp"])
    both = register_service(AgentFactory(is_seller=True), name="Bank reader", tags=["finance"])
    styled_tag = Tag.objects.create(name="ｆｉｎａｎｃｅ")  # as a listing saved before the normalisation kept it
    styled.tags.add(styled_tag)
    both.tags.add(styled_tag)
    Service.objects.filter(pk=styled.pk).update(keywords="ｆｉｎａｎｃｅ nlp translate translate")
    Tag.objects.create(name="ＮＥＷ")

    class Editor:
        pass

    editor = Editor()
    editor.connection = connection
    importlib.import_module("catalog.migrations.0020_tags_normalised").normalise_tags(apps, editor)

    assert sorted(Tag.objects.values_list("name", flat=True)) == ["finance", "new", "nlp"]
    assert sorted(styled.tags.values_list("name", flat=True)) == ["finance", "nlp"]
    assert list(both.tags.values_list("name", flat=True)) == ["finance"]
    found, _ = service_search(search=ServiceSearch(tags_all=["finance"]), cursor=None, limit=10)
    assert {row["id"] for row in orjson.loads(orjson.dumps(found))} == {str(plain.pk), str(styled.pk),
                                                                                 str(both.pk)}
    assert "finance" in Service.objects.get(pk=styled.pk).keywords
    assert _in_step()
