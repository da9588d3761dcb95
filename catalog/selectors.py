"""Reads of the catalog."""

import functools
import re
import uuid
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from functools import reduce
from operator import and_

from django.contrib.postgres.search import SearchQuery, SearchRank
from django.db import connection, transaction
from django.db.models import BooleanField, Case, Exists, F, FloatField, Func, OuterRef, Q, QuerySet, Value, When
from django.db.models.functions import Cast

from catalog.models import Agent, ApiKey, Availability, Service, ServiceName, ServiceState, Skill, Tag, \
    UpstreamProtocol
from marketplace.errors import InvalidInput, NotFound
from marketplace.pagination import paginate


def agent_get(*, agent_id, owner=None) -> Agent:
    agents = Agent.objects.all() if owner is None else Agent.objects.filter(owner=owner)
    agent = agents.filter(pk=agent_id).first()
    if agent is None:
        raise NotFound("No such agent.", code="agent_not_found")
    return agent


def agent_get_by_handle(*, handle: str) -> Agent:
    agent = Agent.objects.filter(handle=handle, is_active=True).first()
    if agent is None:
        raise NotFound("No such agent.", code="agent_not_found")
    return agent


def agents_of_owner(*, owner) -> QuerySet[Agent]:
    return Agent.objects.filter(owner=owner)


def api_keys_of_agent(*, agent: Agent) -> QuerySet[ApiKey]:
    return agent.api_keys.order_by("-created_at")


def api_key_get(*, agent: Agent, key_id: int) -> ApiKey:
    key = agent.api_keys.filter(pk=key_id).first()
    if key is None:
        raise NotFound("No such API key.", code="api_key_not_found")
    return key


def _with_relations(queryset: QuerySet[Service]) -> QuerySet[Service]:
    return queryset.select_related("seller").prefetch_related("tags", "skills")


def service_get(*, service_id, viewer: Agent | None = None) -> Service:
    """A registered service, or any service of the viewing seller (its own deregistered ones included)."""
    visible = Q(state=ServiceState.REGISTERED)
    if viewer is not None:
        visible |= Q(seller=viewer)
    service = _with_relations(Service.objects.filter(visible, pk=service_id)).first()
    if service is None:
        raise NotFound("No such service.", code="service_not_found")
    return service


def service_only_of_seller(*, seller_id) -> Service:
    """The seller's one registered service, for a proposal that names only the seller (the Pægents SDK may)."""
    found = list(_with_relations(Service.objects.filter(seller_id=seller_id, state=ServiceState.REGISTERED))[:2])
    if not found:
        raise NotFound("The seller has no registered service.", code="service_not_found")
    if len(found) > 1:
        raise InvalidInput("The seller has several services: give service_id.", code="service_id_required")
    return found[0]


def registry_services(*, viewer: Agent, seller_wallet: str | None = None) -> QuerySet[Service]:
    """The Masumi registry: every registered service of the network, and the viewer's own deregistered ones;
    `seller_wallet` narrows it to one seller's (an agent's own registrations: its wallet)."""
    services = Service.objects.filter(Q(state=ServiceState.REGISTERED) | Q(seller=viewer))
    if seller_wallet is not None:
        services = services.filter(seller__wallet_address__iexact=seller_wallet)
    return _with_relations(services)


def service_get_any_state(*, service_id) -> Service:
    """A service whatever its state, for rules that must say why it cannot be used (e.g. deregistered)."""
    service = _with_relations(Service.objects.filter(pk=service_id)).first()
    if service is None:
        raise NotFound("No such service.", code="service_not_found")
    return service


def masumi_service_ids() -> list:
    """Registered services driven through the Masumi Agentic Service API (their availability is polled)."""
    return list(Service.objects.filter(state=ServiceState.REGISTERED, upstream_protocol=UpstreamProtocol.MASUMI)
                .values_list("pk", flat=True))


def services_of_seller(*, seller: Agent) -> QuerySet[Service]:
    return _with_relations(Service.objects.filter(seller=seller))


def skill_get(*, handle: str, skill_name: str) -> Skill:
    """A registered skill of an active agent named by its handle or, as the Services API seed allows, its ID."""
    skills = Skill.objects.select_related("service", "service__seller").filter(
        service__seller__is_active=True, name=skill_name, service__state=ServiceState.REGISTERED)
    skill = skills.filter(service__seller__handle=handle).first()
    if skill is None:
        try:
            skill = skills.filter(service__seller_id=uuid.UUID(handle)).first()
        except ValueError:
            pass
    if skill is None:
        raise NotFound("No such agent or skill.", code="skill_not_found")
    return skill


@dataclass(frozen=True)
class ServiceSearch:
    text: str = ""
    tags_all: list[str] = field(default_factory=list)
    tags_any: list[str] = field(default_factory=list)
    capability: str = ""
    max_unit_price: int | None = None
    min_unit_price: int | None = None
    seller: str = ""
    protocol: str = ""
    skill: str = ""
    token: str = ""
    pricing_type: str = ""
    order_by: str = ""  # relevance | price | newest; relevance when there is text, newest otherwise


_ORDERINGS = {
    "relevance": ["-relevance", "-created_at", "id"],
    "price": ["unit_price", "-created_at", "id"],
    "newest": ["-created_at", "id"],
}
# Typo-tolerant results are ranked by name similarity, a scale unlike ts_rank's: their own sort key, so a cursor
# issued for one kind of result is refused (invalid_cursor) by the other instead of cutting the list in odd places.
_FUZZY_RELEVANCE = ["-name_similarity", "-created_at", "id"]

FUZZY_WORD_SIMILARITY_THRESHOLD = 0.5
# For the statement matching the names' lexicon: its trigram index, never a walk of every name. The planner prices
# pg_trgm's `%>` like any operator, yet it costs ~9 us a name: it chose a sequential scan for a long misspelling
# (170-240 ms over 14,000 names, 6-7 ms through the index), and on a smaller lexicon a walk of its primary key.
ONLY_THE_TRIGRAM_INDEX = "set_config('enable_seqscan', 'off', true), set_config('enable_indexonlyscan', 'off', true)"
# Quoted phrases, -exclusions and `or` (PostgreSQL's websearch syntax) ask for exactly that: no fuzzy matching then.
_WEBSEARCH_SYNTAX = re.compile(r'"|(?:^|\s)-\S|(?:^|\s)or(?:\s|$)', re.IGNORECASE)


def _exact_double(score) -> Cast:
    """A real (float4) score as double precision. Cursors carry the relevance of the last row; PostgreSQL prints a
    real in its shortest form (0.06079271), which read back as a double is not the value it compares against, so
    rows tied on relevance were served again and again. A double round-trips exactly through the cursor."""
    return Cast(score, FloatField())


def _exact_matches(queryset: QuerySet[Service], text: str) -> QuerySet[Service]:
    """Services matching every word of `text`, annotated with their relevance."""
    if connection.vendor != "postgresql":
        # The embedded SQLite default: every word must appear somewhere; name hits rank first.
        words = text.split()
        matches = [Q(name__icontains=w) | Q(keywords__icontains=w) | Q(description__icontains=w) for w in words]
        return queryset.filter(reduce(and_, matches)).annotate(
            relevance=Case(When(name__icontains=text, then=Value(2.0)), default=Value(1.0),
                           output_field=FloatField()))
    query = SearchQuery(text, search_type="websearch", config="english")
    # Full-text match over the weighted vector (name A, tags/capability/skills B, description C) through its GIN
    # index; ts_rank therefore puts a name match above a description-only one.
    rank = _exact_double(SearchRank(F("search_vector"), query))
    return queryset.filter(search_vector=query).annotate(relevance=rank)


def _names_spelt_alike(queryset: QuerySet[Service], text: str) -> QuerySet[Service]:
    """Services whose name is spelt like `text`, annotated with `name_similarity`: the fallback when nothing matches
    every word (probably a misspelling). On PostgreSQL it reads the database once here (the names spelt alike), so
    it runs where pg_trgm's threshold is set (service_search)."""
    if connection.vendor != "postgresql":
        return _names_spelt_alike_in_python(queryset, text)
    # Names containing something spelt alike: pg_trgm word similarity (`%>`, served by the trigram GIN index), so one
    # misspelt word finds a long name too. Only as a fallback: OR-ing fuzzy matches into every query made common
    # queries ~7x slower at 100k services (similarity rechecked on thousands of rows) and let them slip past quoted
    # phrases and -exclusions. Ranked by the mean of word similarity and whole-name similarity, so the tightest
    # name comes first.
    # Matched among the distinct names (ServiceName), each scored once, and the services then read by name: the
    # same services and scores as matching and scoring every service's name, which at 100,000 services (14,000
    # distinct names) cost 40 ms in the trigram index and as much again scoring 1,300 rows.
    with connection.cursor() as cursor:
        cursor.execute(_names_spelt_alike_statement(), [text, text, text])
        (scores,) = cursor.fetchone()
    if scores is None:
        return queryset.none().annotate(name_similarity=Value(0.0, output_field=FloatField()))
    return queryset.filter(_NameAmong(F("name"), Value(scores))).annotate(
        name_similarity=_ScoreOfName(Value(scores), F("name")))


@functools.cache
def _names_spelt_alike_statement() -> str:
    """The names of the lexicon spelt like the text (given three times), as one JSON object of name -> score; the
    score is the one `(word_similarity + similarity) / 2` of the name, as double precision. Aggregated by
    PostgreSQL and handed back whole: turning ~200 names into Python values and back into a statement cost more CPU
    than reading the page."""
    table, name = connection.ops.quote_name(ServiceName._meta.db_table), connection.ops.quote_name("name")
    return (f"SELECT jsonb_object_agg(alike.name, alike.score)::text FROM (SELECT {name} AS name, "  # noqa: S608
            f"((word_similarity(%s, {name}) + similarity({name}, %s)) / 2)::double precision AS score "
            f"FROM {table} WHERE {name} %%> %s) AS alike")


class _NameAmong(Func):
    """The service's name is a key of a JSON object of name -> score: one array the name index is probed with (an
    IN list of 200 names took 5 ms to plan)."""

    output_field = BooleanField()

    def as_sql(self, compiler, connection, **extra):
        name_sql, name_params = compiler.compile(self.source_expressions[0])
        scores_sql, scores_params = compiler.compile(self.source_expressions[1])
        return (f"{name_sql} = ANY(ARRAY(SELECT jsonb_object_keys({scores_sql}::jsonb)))",
                [*name_params, *scores_params])


class _ScoreOfName(Func):
    """The score of a service's name in a JSON object of name -> score, as double precision: the double PostgreSQL
    wrote into the JSON (in its shortest exact form), so a cursor's score still compares equal on the next page."""

    template = "((%(expressions)s)::double precision)"
    arg_joiner = "::jsonb ->> "
    output_field = FloatField()


# The fallback without pg_trgm (SQLite, `make run`'s default) reads at most this many names, newest first: a
# development catalog fits whole; a large catalog belongs on PostgreSQL, whose trigram index has no such bound.
SQLITE_FUZZY_CANDIDATES = 5000
# difflib's ratio (2 × matching characters / total) is more generous than trigram similarity: "sumarize" and
# "summarizer" score 0.89, unrelated words of similar length about 0.3-0.5.
SQLITE_FUZZY_WORD_RATIO = 0.7


def name_similarity(text: str, name: str) -> float:
    """How alike `text` is to `name`, 0 to 1, as pg_trgm's ranking does it: the mean of word similarity (each word
    of `text` against its closest word of `name`) and whole-name similarity; 0 when a word has no close match."""
    words, name_words = text.lower().split(), name.lower().split()
    if not words or not name_words:
        return 0.0
    best = [max(SequenceMatcher(None, word, candidate).ratio() for candidate in name_words) for word in words]
    if min(best) < SQLITE_FUZZY_WORD_RATIO:
        return 0.0
    whole = SequenceMatcher(None, text.lower(), name.lower()).ratio()
    return (sum(best) / len(best) + whole) / 2


def _names_spelt_alike_in_python(queryset: QuerySet[Service], text: str) -> QuerySet[Service]:
    """The typo-tolerant fallback where the database has no trigram matching: names compared in Python (difflib)
    over the newest SQLITE_FUZZY_CANDIDATES candidates, annotated with `name_similarity` like PostgreSQL's."""
    candidates = queryset.order_by("-created_at").values_list("pk", "name")[:SQLITE_FUZZY_CANDIDATES]
    scores = {pk: score for pk, name in candidates if (score := name_similarity(text, name)) > 0}
    return queryset.filter(pk__in=list(scores)).annotate(name_similarity=Case(
        *[When(pk=pk, then=Value(score)) for pk, score in scores.items()], default=Value(0.0),
        output_field=FloatField()))


def _with_tag(tag_ids: list[int]) -> Exists:
    return Exists(Service.tags.through.objects.filter(service_id=OuterRef("pk"), tag_id__in=tag_ids))


@dataclass(frozen=True)
class OffsetPage:
    rows: list[dict]
    total: int
    next_offset: int | None


# What a search result shows of a service (catalog.serializers.ServiceSearchResultSerializer), read as plain values.
_SEARCH_RESULT_FIELDS = (
    "id", "seller_id", "seller__handle", "seller__display_name", "seller__wallet_address", "name", "description",
    "capability_name", "capability_version", "author", "legal", "example_outputs", "pricing_type", "unit_name",
    "unit_price", "token", "upstream_protocol", "masumi_protocol_version", "state", "availability",
    "availability_checked_at", "category", "min_quantity", "max_quantity", "capabilities", "metadata", "created_at",
    "updated_at",
)
_SEARCH_RESULT_SKILL_FIELDS = ("name", "description", "price", "path", "is_async", "timeout_seconds")


@dataclass(frozen=True)
class _Statement:
    """A SELECT written once from the models' metadata, and per column its converters (what the ORM applies)."""

    sql: str  # with `{ids}` where the page's service ids go
    converters: list[tuple]  # per column: the column expression and its converters


def _statement(model, fields: tuple[str, ...], *, key: str, order_by: str | None = None) -> _Statement:
    """SELECT `fields` of `model` (a name with `__` follows a foreign key, one level) WHERE `key` IN the page's ids,
    ordered by `order_by` (one of `fields`)."""
    quote, columns, joins, converters = connection.ops.quote_name, [], {}, []
    for name in fields:
        owner, alias, attribute = model, "t0", name
        if "__" in name:
            relation_name, attribute = name.split("__")
            relation = model._meta.get_field(relation_name)
            owner, alias = relation.related_model, f"t{len(joins) + 1}"
            alias = joins.setdefault(relation_name, (alias, relation))[0]
        field = owner._meta.get_field(attribute)
        columns.append(f"{alias}.{quote(field.column)}")
        column = field.get_col(alias)
        converters.append((column, connection.ops.get_db_converters(column) + field.get_db_converters(connection)))
    join_sql = " ".join(
        f"JOIN {quote(relation.related_model._meta.db_table)} {alias} ON {alias}."
        f"{quote(relation.target_field.column)} = t0.{quote(relation.column)}" for alias, relation in joins.values())
    order = f" ORDER BY {columns[fields.index(order_by)]}" if order_by else ""
    key_column = quote(model._meta.get_field(key).column)
    return _Statement(f"SELECT {', '.join(columns)} FROM {quote(model._meta.db_table)} t0 {join_sql} "  # noqa: S608
                      f"WHERE t0.{key_column} IN ({{ids}}){order}", converters)


@functools.cache
def _search_result_statements() -> tuple[_Statement, _Statement, _Statement]:
    """The three reads of a page's rows (services with their sellers, their tags by name, their skills by name),
    written once per process: compiling them with the ORM on every search, and its generic conversion of each value,
    took ~4 of the ~7 ms of CPU of reading a page's rows."""
    tag_link = Service.tags.through
    return (
        _statement(Service, _SEARCH_RESULT_FIELDS, key="id"),
        _statement(tag_link, ("service", "tag__name"), key="service", order_by="tag__name"),
        _statement(Skill, ("service", *_SEARCH_RESULT_SKILL_FIELDS), key="service", order_by="name"),
    )


def _read(statement: _Statement, ids: list, id_field) -> list[list]:
    """The rows of `statement` for `ids`, each value converted as the ORM converts it."""
    params = [id_field.get_db_prep_value(i, connection) for i in ids]
    with connection.cursor() as cursor:
        cursor.execute(statement.sql.format(ids=", ".join(["%s"] * len(ids))), params)
        rows = cursor.fetchall()
    converted = []
    for row in rows:
        values = []
        for value, (column, converters) in zip(row, statement.converters, strict=True):
            for convert in converters:
                value = convert(value, column, connection)
            values.append(value)
        converted.append(values)
    return converted


def _result_rows(keys: list[dict], score: str | None) -> list[dict]:
    """The services of `keys` (the page's narrow rows, in page order) as plain values with their seller, tags (by
    name), skills (by name) and, when ranked, their relevance (the keys' `score`). Values, not model instances:
    building and serializing instances with their related managers was most of the CPU of answering a page."""
    if not keys:
        return []
    ids = [key["id"] for key in keys]
    services, tag_links, skill_rows = _search_result_statements()
    id_field = Service._meta.pk
    rows = {values[0]: dict(zip(_SEARCH_RESULT_FIELDS, values, strict=True))
            for values in _read(services, ids, id_field)}
    tags: dict = {service_id: [] for service_id in ids}
    for service_id, tag in _read(tag_links, ids, id_field):
        tags[service_id].append(tag)
    skills: dict = {service_id: [] for service_id in ids}
    for service_id, *values in _read(skill_rows, ids, id_field):
        skills[service_id].append(dict(zip(_SEARCH_RESULT_SKILL_FIELDS, values, strict=True)))
    page = []
    for key in keys:
        row = rows[key["id"]]
        row["tags"], row["skills"] = tags[key["id"]], skills[key["id"]]
        if score:
            row["relevance"] = key[score]
        page.append(row)
    return page


def service_search(*, search: ServiceSearch, cursor: str | None, limit: int,
                   offset: int | None = None) -> tuple[list[dict], str | None] | OffsetPage:
    """A page of matching services: after `cursor` (keyset), or from `offset` (the Pægents SDK's paging, with the
    total count) when an offset is given."""
    # A Masumi service that said it cannot take jobs is left out until its next availability check says it can.
    services = Service.objects.filter(state=ServiceState.REGISTERED, seller__is_active=True).exclude(
        availability=Availability.UNAVAILABLE)
    # Tag names to ids first (one small query): a tag nobody uses means no results, and the filters below become
    # semi-joins on the (service, tag) index instead of joins through the tag table.
    tag_names = {*search.tags_all, *search.tags_any}
    tag_ids = dict(Tag.objects.filter(name__in=tag_names).values_list("name", "id")) if tag_names else {}
    if any(tag not in tag_ids for tag in search.tags_all):
        services = services.none()
    for tag in search.tags_all:
        if tag in tag_ids:
            services = services.filter(_with_tag([tag_ids[tag]]))
    if search.tags_any:
        known = [tag_ids[t] for t in search.tags_any if t in tag_ids]
        services = services.filter(_with_tag(known)) if known else services.none()
    if search.capability:
        services = services.filter(capability_name__iexact=search.capability)
    if search.max_unit_price is not None:
        services = services.filter(unit_price__lte=search.max_unit_price)
    if search.min_unit_price is not None:
        services = services.filter(unit_price__gte=search.min_unit_price)
    if search.seller:
        services = services.filter(seller__handle=search.seller)
    if search.protocol:
        services = services.filter(upstream_protocol=search.protocol)
    if search.skill:
        services = services.filter(Exists(Skill.objects.filter(service_id=OuterRef("pk"), name=search.skill)))
    if search.token:
        services = services.filter(token=search.token)
    if search.pricing_type:
        services = services.filter(pricing_type=search.pricing_type)
    text = search.text.strip()
    order_by = search.order_by or ("relevance" if text else "newest")
    if order_by == "relevance" and not text:
        order_by = "newest"
    ordering = _ORDERINGS[order_by]
    page = functools.partial(_page, cursor=cursor, limit=limit, offset=offset)
    if not text:
        return page(services, ordering=ordering)
    # After the filters, so "nothing matches exactly" means nothing within them.
    exact = _exact_matches(services, text)
    if _WEBSEARCH_SYNTAX.search(text):
        return page(exact, ordering=ordering, score="relevance")
    if not cursor and not offset:
        # A first page says itself whether anything matches exactly (it is empty only when nothing does): one
        # statement, where asking first and then reading the page searched the index twice.
        found = page(exact, ordering=ordering, score="relevance")
        if found.rows if isinstance(found, OffsetPage) else found[0]:
            return found
    elif exact.exists():
        return page(exact, ordering=ordering, score="relevance")
    if order_by == "relevance":
        ordering = _FUZZY_RELEVANCE
    if connection.vendor != "postgresql":
        return page(_names_spelt_alike(services, text), ordering=ordering, score="name_similarity")
    with transaction.atomic(), connection.cursor() as db:
        # For this transaction only: pg_trgm's default word-similarity threshold (0.6) misses a single typo in a
        # short word ("invoce", "wether"); 0.5 catches those and still keeps unrelated names out.
        # And the planner kept to the lexicon's trigram index (ONLY_THE_TRIGRAM_INDEX); the page's statement then
        # reads services through the name index anyway.
        db.execute("SELECT set_config('pg_trgm.word_similarity_threshold', %s, true), " + ONLY_THE_TRIGRAM_INDEX,
                   [str(FUZZY_WORD_SIMILARITY_THRESHOLD)])
        return page(_names_spelt_alike(services, text), ordering=ordering, score="name_similarity")


def _page(services: QuerySet[Service], *, ordering: list[str], cursor: str | None, limit: int, offset: int | None,
          score: str | None = None) -> tuple[list[dict], str | None] | OffsetPage:
    """A page of `services` in `ordering`, after `cursor` or from `offset`, as result rows; a row's relevance is its
    `score` annotation. The page is chosen by a narrow statement (the key, the sort values, the score), then its
    rows are read by key: sorting thousands of text matches carried every column of each through the sort (about
    half of a text search's time in the database at 100,000 services)."""
    keys = services.values("id", "created_at", "unit_price", *([score] if score else []))
    if offset is None:
        page_keys, next_cursor = paginate(keys, ordering=ordering, cursor=cursor, limit=limit)
        return _result_rows(page_keys, score), next_cursor
    page_keys = list(keys.order_by(*ordering)[offset:offset + limit + 1])
    more = len(page_keys) > limit
    # A last page counts itself; only a page with more after it asks the database for the total.
    total = services.count() if more or (offset and not page_keys) else offset + len(page_keys)
    return OffsetPage(rows=_result_rows(page_keys[:limit], score), total=total,
                      next_offset=offset + limit if more else None)
