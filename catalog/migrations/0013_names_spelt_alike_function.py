"""The typo-tolerant search's match among the names' lexicon as a function, `catalog_names_spelt_alike(text)`: the
names spelt like the text, as one JSON object of name -> score, the score being `(word_similarity + similarity) / 2`
as double precision (catalog.selectors._names_spelt_alike).

The match needs settings of its own: pg_trgm's word-similarity threshold at 0.5 (its default, 0.6, misses a single
typo in a short word, "invoce" or "wether"; 0.5 catches those and still keeps unrelated names out), and the trigram
index only (the planner prices `%>` like any operator, yet it costs ~9 us a name: left alone it walked every name
for a long misspelling, 170-240 ms over 14,000 names against 6-7 ms through the index). They were set by a statement
sent just before the match in the same round trip, so the match was parsed and planned on every search, and the
page was read in a round trip after it. As the function's own settings they hold while it runs and end with it;
PL/pgSQL keeps the match's plan for the connection; and the page's statement calls the function, so a misspelling's
page is one statement. At 100,000 services, 'invoce extracter' in one process: PostgreSQL's CPU per search 8.07 ->
7.07 ms, the process's 2.12 -> 1.84 ms (medians of eight interleaved blocks of 150).
"""

from django.db import migrations

from marketplace.migration_operations import PostgreSQLOnlySQL

FORWARD = """
CREATE FUNCTION catalog_names_spelt_alike(spelt text) RETURNS jsonb LANGUAGE plpgsql STABLE
    SET pg_trgm.word_similarity_threshold = 0.5 SET enable_seqscan = off SET enable_indexonlyscan = off AS $$
BEGIN
    RETURN (SELECT jsonb_object_agg(alike.name, alike.score) FROM (
        SELECT name, ((word_similarity($1, name) + similarity(name, $1)) / 2)::double precision AS score
        FROM catalog_servicename WHERE name %> $1) AS alike);
END $$
"""
BACKWARD = "DROP FUNCTION catalog_names_spelt_alike(text)"


class Migration(migrations.Migration):
    dependencies = [("catalog", "0012_posting_scores")]

    operations = [PostgreSQLOnlySQL([FORWARD], [BACKWARD])]
