"""Search on the embedded SQLite default (`make run`): a misspelt name is found through the Python fallback.

The suite runs on PostgreSQL; this test then runs itself again in a pytest subprocess on an SQLite database, so
the fallback is exercised on the database it is for.
"""

import pytest

from catalog.selectors import name_similarity
from tests.catalog.test_search import listing, names, search
from tests.support.on_sqlite import ran_again_on_sqlite

pytestmark = pytest.mark.django_db

@pytest.mark.parametrize(("text", "name", "alike"), [
    ("sumarize", "Summarizer", True), ("invoce extracter", "Invoice extractor", True),
    ("zanzibr ferri", "Zanzibar ferry booker", True), ("sumarize", "Fast translator", False),
    ("invoce extracter", "Market research crew", False), ("weather", "Leather goods", True)])
def test_names_spelt_alike(text, name, alike):
    assert (name_similarity(text, name) > 0) is alike


@pytest.mark.slow
def test_sqlite_finds_sumarize_as_summarizer(seller, buyer_api, request, tmp_path):
    if ran_again_on_sqlite(request, tmp_path):
        return
    listing(seller, "Summarizer", description="Summarizes long documents into five bullet points.",
            tags=["nlp", "summary"])
    listing(seller, "Fast translator", tags=["nlp"])
    listing(seller, "Summary archive", description="Old summaries.", tags=["archive"])

    assert names(buyer_api, q="sumarize", tags_any=["nlp"], max_unit_price_atomic=50_000) == ["Summarizer"]
    ranked = search(buyer_api, q="sumarize")["results"]
    assert ranked[0]["name"] == "Summarizer" and 0 < ranked[0]["relevance"] <= 1
    assert names(buyer_api, q="translator") == ["Fast translator"]  # an exact match: no fallback
    exact = search(buyer_api, q="nlp")["results"]  # a tag, not a name: the lower of the two scores
    assert [(s["name"], s["relevance"]) for s in exact] == [("Fast translator", 0.5), ("Summarizer", 0.5)]
    assert names(buyer_api, q='"sumarize"') == []  # a quoted phrase asks for exactly that
