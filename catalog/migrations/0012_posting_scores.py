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

# The lexeme's score: its weight in the service alone. The lexeme is read as a query in tsquery's text form (quoted,
# a quote or backslash in it doubled).
SCORE = r"""ts_rank(s.search_vector,
                     ('''' || replace(replace(entry.lexeme, '\', '\\'), '''', '''''') || '''')::tsquery)"""

REWRITE_ALL = "SELECT catalog_service_postings_write(ARRAY(SELECT id FROM catalog_service))"

FORWARD = [
    "TRUNCATE catalog_service_posting",
    "ALTER TABLE catalog_service_posting DROP CONSTRAINT catalog_service_posting_pkey, DROP COLUMN positions, "
    "ADD COLUMN score real NOT NULL, "
    "ADD PRIMARY KEY (lexeme, service_id) INCLUDE (score, created_at, unit_price)",
    service_postings.write_postings("score", SCORE),
    REWRITE_ALL,
    "ANALYZE catalog_service_posting",  # the plans' statistics now; autovacuum sets the visibility map later
]
BACKWARD = [
    "TRUNCATE catalog_service_posting",
    "ALTER TABLE catalog_service_posting DROP CONSTRAINT catalog_service_posting_pkey, DROP COLUMN score, "
    "ADD COLUMN positions text NOT NULL, "
    "ADD PRIMARY KEY (lexeme, service_id) INCLUDE (positions, created_at, unit_price)",
    service_postings.write_postings("positions", service_postings.POSITIONS),
    REWRITE_ALL,
]


class Migration(migrations.Migration):
    dependencies = [("catalog", "0011_service_postings")]

    operations = [PostgreSQLOnlySQL(FORWARD, BACKWARD)]
