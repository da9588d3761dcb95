"""`catalog_names_spelt_alike(text)` returns the names spelt alike as rows (name, score), estimated at 20, instead
of one JSON object. The page's statement joins them to the services by name; given `jsonb_each_text`'s estimate of
100 entries, the planner at times hashed every visible name instead of probing the name index with each name spelt
alike (seen on the tests' small tables), reading every service rather than the best names'. Rows also spare writing
and reading the JSON.
"""

import importlib

from django.db import migrations

from marketplace.migration_operations import PostgreSQLOnlySQL

as_json = importlib.import_module("catalog.migrations.0013_names_spelt_alike_function")

DROP = "DROP FUNCTION catalog_names_spelt_alike(text)"
# The output columns are the function's parameters too: the lexicon's column is named through its alias.
AS_ROWS = """
CREATE FUNCTION catalog_names_spelt_alike(spelt text) RETURNS TABLE (name text, score double precision)
    LANGUAGE plpgsql STABLE ROWS 20
    SET pg_trgm.word_similarity_threshold = 0.5 SET enable_seqscan = off SET enable_indexonlyscan = off AS $$
BEGIN
    RETURN QUERY (
        SELECT lexicon.name::text,
               ((word_similarity($1, lexicon.name) + similarity(lexicon.name, $1)) / 2)::double precision
        FROM catalog_servicename lexicon WHERE lexicon.name %> $1);
END $$
"""


class Migration(migrations.Migration):
    dependencies = [("catalog", "0013_names_spelt_alike_function")]

    operations = [PostgreSQLOnlySQL([DROP, AS_ROWS], [DROP, as_json.FORWARD])]
