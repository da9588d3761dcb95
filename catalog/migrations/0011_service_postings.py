"""The postings of the visible services' search vectors (PostgreSQL only): one row per (lexeme, service) with that
lexeme's positions and weights, and the columns a text search sorts on. A plain text search (every word must match)
reads the rows of its lexemes by an index-only scan and merge-joins them on the service, instead of visiting the
heap page of every match through the GIN index and ranking its whole vector: at 100,000 services "invoice
extraction" (5,300 matches on 4,600 pages) took 17.7 ms that way and 6 ms from the postings (catalog.selectors).

Only visible services have postings (registered, of an active seller, not unavailable: catalog.selectors'
_visible_services), so the postings need no filter. Triggers keep them in step with every write to a service or to
a seller's is_active, whatever writes it (catalog.services, the admin, the availability poll, a set-based UPDATE),
and the backfill below writes them for the services already there. Likewise the visible services by name, which
the typo-tolerant search reads.
"""

from django.db import migrations

from marketplace.migration_operations import PostgreSQLOnlySQL


def write_postings(column: str, value: str, seller_sells: str = "a.is_active") -> str:
    """The function rewriting the postings and visible names of the given services from their current rows, each
    posting holding `value` (an expression over the service `s` and `entry`, one lexeme of its vector unnested) in
    `column`; a service is visible when its seller `a` meets `seller_sells` (its owner's activity too since 0017).

    It first waits for any other transaction writing one of these services (a no-op for the services of the
    statement that fired it, already locked by it): a seller's is_active changing while one of its services
    changes, each statement then sees the other's committed rows. Sellers are not locked: whoever holds one
    (catalog.services locks the seller before a service) never waits here for a service another transaction
    holds."""
    return f"""
CREATE OR REPLACE FUNCTION catalog_service_postings_write(service_ids uuid[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM catalog_service WHERE id = ANY(service_ids) FOR SHARE;
    DELETE FROM catalog_service_posting p USING unnest(service_ids) AS changed (id) WHERE p.service_id = changed.id;
    INSERT INTO catalog_service_posting (lexeme, service_id, {column}, created_at, unit_price)
    SELECT entry.lexeme, s.id, {value}, s.created_at, s.unit_price
    FROM unnest(service_ids) AS changed (id)
        JOIN catalog_service s ON s.id = changed.id
        JOIN catalog_agent a ON a.id = s.seller_id
        CROSS JOIN unnest(s.search_vector) AS entry
    WHERE s.state = 'registered' AND {seller_sells} AND s.availability <> 'unavailable';
    DELETE FROM catalog_service_visible_name v USING unnest(service_ids) AS changed (id)
        WHERE v.service_id = changed.id;
    INSERT INTO catalog_service_visible_name (name, service_id, created_at, unit_price)
    SELECT s.name, s.id, s.created_at, s.unit_price
    FROM unnest(service_ids) AS changed (id)
        JOIN catalog_service s ON s.id = changed.id
        JOIN catalog_agent a ON a.id = s.seller_id
    WHERE s.state = 'registered' AND {seller_sells} AND s.availability <> 'unavailable';
END $$
"""


# Each posting's positions and weights, as tsvector's text form writes them after the lexeme: 3A,17C
POSITIONS = """(SELECT string_agg(position::text || CASE weight WHEN 'D' THEN '' ELSE weight END, ',' ORDER BY n)
                FROM unnest(entry.positions, entry.weights) WITH ORDINALITY AS e (position, weight, n))"""

# The table has no foreign key: Django's flush (TRUNCATE of its own tables, in tests) would refuse to truncate the
# services it references; deletes and truncates of services reach the postings through triggers instead.
CREATE = [
    """
    CREATE TABLE catalog_service_posting (
        lexeme text NOT NULL,
        service_id uuid NOT NULL,
        positions text NOT NULL,  -- as tsvector's text form writes them after the lexeme: 3A,17C
        created_at timestamptz NOT NULL,
        unit_price numeric(78, 0) NOT NULL,
        PRIMARY KEY (lexeme, service_id) INCLUDE (positions, created_at, unit_price)
    )
    """,
    "CREATE INDEX catalog_service_posting_service_idx ON catalog_service_posting (service_id)",
    # The visible services by name, for the typo-tolerant search: it reads the services bearing the names spelt
    # like the text (catalog.selectors._names_spelt_alike), 1,300 of them for "invoce extracter" at 100,000
    # services, each on its own heap page of catalog_service (4.6 ms); here an index-only scan (1 ms).
    """
    CREATE TABLE catalog_service_visible_name (
        name varchar(250) NOT NULL,
        service_id uuid NOT NULL,
        created_at timestamptz NOT NULL,
        unit_price numeric(78, 0) NOT NULL,
        PRIMARY KEY (name, service_id) INCLUDE (created_at, unit_price)
    )
    """,
    "CREATE INDEX catalog_service_visible_name_service_idx ON catalog_service_visible_name (service_id)",
    write_postings("positions", POSITIONS),
    """
    CREATE FUNCTION catalog_service_postings_on_write() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            PERFORM catalog_service_postings_write(ARRAY(SELECT id FROM new_rows));
        ELSE
            PERFORM catalog_service_postings_write(ARRAY(
                SELECT n.id FROM new_rows n JOIN old_rows o ON o.id = n.id
                WHERE (n.search_vector, n.name, n.state, n.availability, n.seller_id, n.created_at, n.unit_price)
                      IS DISTINCT FROM (o.search_vector, o.name, o.state, o.availability, o.seller_id, o.created_at,
                                        o.unit_price)));
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE FUNCTION catalog_service_postings_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM catalog_service_posting p USING old_rows o WHERE p.service_id = o.id;
        DELETE FROM catalog_service_visible_name v USING old_rows o WHERE v.service_id = o.id;
        RETURN NULL;
    END $$
    """,
    """
    CREATE FUNCTION catalog_service_postings_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        TRUNCATE catalog_service_posting, catalog_service_visible_name;
        RETURN NULL;
    END $$
    """,
    """
    CREATE FUNCTION catalog_service_postings_on_seller() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM catalog_service_postings_write(ARRAY(
            SELECT s.id FROM catalog_service s JOIN new_rows n ON n.id = s.seller_id JOIN old_rows o ON o.id = n.id
            WHERE n.is_active IS DISTINCT FROM o.is_active));
        RETURN NULL;
    END $$
    """,
    # Per statement, over its transition tables: a set-based UPDATE of 100,000 services rewrites their postings in
    # one pass (the benchmark's seed). A trigger with transition tables cannot name columns, so every UPDATE fires it
    # and it picks the rows whose postings change.
    """
    CREATE TRIGGER catalog_service_postings_insert AFTER INSERT ON catalog_service
        REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION catalog_service_postings_on_write()
    """,
    """
    CREATE TRIGGER catalog_service_postings_update AFTER UPDATE ON catalog_service
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION catalog_service_postings_on_write()
    """,
    """
    CREATE TRIGGER catalog_service_postings_delete AFTER DELETE ON catalog_service
        REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION catalog_service_postings_on_delete()
    """,
    """
    CREATE TRIGGER catalog_service_postings_truncate AFTER TRUNCATE ON catalog_service
        FOR EACH STATEMENT EXECUTE FUNCTION catalog_service_postings_on_truncate()
    """,
    """
    CREATE TRIGGER catalog_service_postings_seller AFTER UPDATE ON catalog_agent
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION catalog_service_postings_on_seller()
    """,
    "SELECT catalog_service_postings_write(ARRAY(SELECT id FROM catalog_service))",
]
DROP = [
    "DROP TRIGGER catalog_service_postings_seller ON catalog_agent",
    "DROP TRIGGER catalog_service_postings_truncate ON catalog_service",
    "DROP TRIGGER catalog_service_postings_delete ON catalog_service",
    "DROP TRIGGER catalog_service_postings_update ON catalog_service",
    "DROP TRIGGER catalog_service_postings_insert ON catalog_service",
    "DROP FUNCTION catalog_service_postings_on_seller()",
    "DROP FUNCTION catalog_service_postings_on_truncate()",
    "DROP FUNCTION catalog_service_postings_on_delete()",
    "DROP FUNCTION catalog_service_postings_on_write()",
    "DROP FUNCTION catalog_service_postings_write(uuid[])",
    "DROP TABLE catalog_service_visible_name",
    "DROP TABLE catalog_service_posting",
]


class Migration(migrations.Migration):
    dependencies = [("catalog", "0010_service_name_lexicon")]

    operations = [PostgreSQLOnlySQL(CREATE, DROP)]
