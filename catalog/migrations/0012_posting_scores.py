"""Each posting carries its lexeme's score in the service (ts_rank of the service's vector for that lexeme alone)
instead of the lexeme's positions. A text search's relevance is the mean of its words' scores
(catalog.selectors._relevance), which the postings now answer with one addition per match: at 100,000 services
the statement choosing the first page of "invoice extraction" took 10.5 ms, 7 of them parsing each match's
positions back into a tsvector to rank it, and takes 3.6 ms. The postings are rewritten from the services' rows.
"""

import importlib

from django.db import migrations

from marketplace.migration_operations import PostgreSQLOnlySQL

service_postings = importlib.import_module("catalog.migrations.0011_service_postings")

# As 0011's, writing the score where that wrote the positions. The lexeme is read as a query in tsquery's text form:
# quoted, a quote or backslash in it doubled.
WRITE_POSTINGS = r"""
CREATE OR REPLACE FUNCTION catalog_service_postings_write(service_ids uuid[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM catalog_service WHERE id = ANY(service_ids) FOR SHARE;
    DELETE FROM catalog_service_posting p USING unnest(service_ids) AS changed (id) WHERE p.service_id = changed.id;
    INSERT INTO catalog_service_posting (lexeme, service_id, score, created_at, unit_price)
    SELECT entry.lexeme, s.id,
           ts_rank(s.search_vector,
                   ('''' || replace(replace(entry.lexeme, '\', '\\'), '''', '''''') || '''')::tsquery),
           s.created_at, s.unit_price
    FROM unnest(service_ids) AS changed (id)
        JOIN catalog_service s ON s.id = changed.id
        JOIN catalog_agent a ON a.id = s.seller_id
        CROSS JOIN unnest(s.search_vector) AS entry
    WHERE s.state = 'registered' AND a.is_active AND s.availability <> 'unavailable';
    DELETE FROM catalog_service_visible_name v USING unnest(service_ids) AS changed (id)
        WHERE v.service_id = changed.id;
    INSERT INTO catalog_service_visible_name (name, service_id, created_at, unit_price)
    SELECT s.name, s.id, s.created_at, s.unit_price
    FROM unnest(service_ids) AS changed (id)
        JOIN catalog_service s ON s.id = changed.id
        JOIN catalog_agent a ON a.id = s.seller_id
    WHERE s.state = 'registered' AND a.is_active AND s.availability <> 'unavailable';
END $$
"""

REWRITE_ALL = "SELECT catalog_service_postings_write(ARRAY(SELECT id FROM catalog_service))"

FORWARD = [
    "TRUNCATE catalog_service_posting",
    "ALTER TABLE catalog_service_posting DROP CONSTRAINT catalog_service_posting_pkey, DROP COLUMN positions, "
    "ADD COLUMN score real NOT NULL, "
    "ADD PRIMARY KEY (lexeme, service_id) INCLUDE (score, created_at, unit_price)",
    WRITE_POSTINGS,
    REWRITE_ALL,
    "ANALYZE catalog_service_posting",  # the plans' statistics now; autovacuum sets the visibility map later
]
BACKWARD = [
    "TRUNCATE catalog_service_posting",
    "ALTER TABLE catalog_service_posting DROP CONSTRAINT catalog_service_posting_pkey, DROP COLUMN score, "
    "ADD COLUMN positions text NOT NULL, "
    "ADD PRIMARY KEY (lexeme, service_id) INCLUDE (positions, created_at, unit_price)",
    service_postings.WRITE_POSTINGS.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1),
    REWRITE_ALL,
]


class Migration(migrations.Migration):
    dependencies = [("catalog", "0011_service_postings")]

    operations = [PostgreSQLOnlySQL(FORWARD, BACKWARD)]
