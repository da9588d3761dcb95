"""Reads of the catalog."""

import enum
import functools
import re
import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from difflib import SequenceMatcher

import orjson
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.models import Q, QuerySet
from django.utils import timezone

from catalog.models import SERVICE_POSTINGS_TABLE, VISIBLE_SERVICE_NAMES_TABLE, Agent, ApiKey, Availability, \
    OwnerToken, Service, ServiceState, Skill, Tag
from marketplace import text_search
from marketplace.caching import kept_for_a_second
from marketplace.errors import InvalidInput, NotFound
from marketplace.pagination import cursor_after, cursor_issued_for, cursor_values
from marketplace.postgresql import prepared_cursor, transaction_in_pipelines
from marketplace.serializers import CENTS, cents_of


def agent_get(*, agent_id, owner=None) -> Agent:
    agents = Agent.objects.all() if owner is None else Agent.objects.filter(owner=owner)
    agent = agents.filter(pk=agent_id).first()
    if agent is None:
        raise NotFound("No such agent.", code="agent_not_found")
    return agent


def uuid_or_none(text: str) -> uuid.UUID | None:
    """`text` as a UUID when it spells one (any spelling Python reads: with or without hyphens), else None."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def agent_get_by_handle(*, handle: str) -> Agent:
    agent = Agent.objects.filter(handle=handle, is_active=True, owner_is_active=True).first()
    if agent is None:
        raise NotFound("No such agent.", code="agent_not_found")
    return agent


def agents_of_owner(*, owner) -> QuerySet[Agent]:
    return Agent.objects.filter(owner=owner)


API_KEY_ORDERING = ["-created_at", "-id"]


def api_keys_of_agent(*, agent: Agent, include_revoked: bool = False) -> QuerySet[ApiKey]:
    """The agent's keys, unrevoked ones only unless `include_revoked` (revoked keys are kept for ever), in
    `API_KEY_ORDERING` (newest first)."""
    keys = agent.api_keys.all() if include_revoked else agent.api_keys.filter(revoked_at=None)
    return keys.order_by(*API_KEY_ORDERING)


def api_key_get(*, agent: Agent, key_id: int) -> ApiKey:
    key = agent.api_keys.filter(pk=key_id).first()
    if key is None:
        raise NotFound("No such API key.", code="api_key_not_found")
    return key


def owner_tokens_of(*, owner, include_revoked: bool = False) -> QuerySet[OwnerToken]:
    """The owner's tokens, unrevoked ones only unless `include_revoked`, in `API_KEY_ORDERING` (newest first)."""
    tokens = OwnerToken.objects.filter(owner=owner)
    return (tokens if include_revoked else tokens.filter(revoked_at=None)).order_by(*API_KEY_ORDERING)


def owner_token_get(*, owner, token_id: int) -> OwnerToken:
    """The owner's token `token_id`; 404 for another owner's, as for one that does not exist."""
    token = OwnerToken.objects.filter(owner=owner, pk=token_id).first()
    if token is None:
        raise NotFound("No such owner token.", code="owner_token_not_found")
    return token


def _with_relations(queryset: QuerySet[Service]) -> QuerySet[Service]:
    return queryset.select_related("seller").prefetch_related("tags", "skills")


def _for_proposal(queryset: QuerySet[Service]) -> QuerySet[Service]:
    """What a proposal reads of its service: the seller, and the tags its buyer's policy may name (not the skills)."""
    return queryset.select_related("seller").prefetch_related("tags")


# Where search, the registry and the skill route list a service: registered, its seller and the seller's owner active.
LISTED = Q(state=ServiceState.REGISTERED, seller__is_active=True, seller__owner_is_active=True)


def service_shown(*, service_id, viewer: Agent) -> Service:
    """A service as the catalog shows it: listed (registered, its seller and the seller's owner active: as search,
    the registry and the skill route list it), or the viewer's own in any state; else 404 `service_not_found`."""
    service = _with_relations(Service.objects.filter(LISTED | Q(seller=viewer), pk=service_id)).first()
    if service is None:
        raise NotFound("No such service.", code="service_not_found")
    return service


def service_of_seller(*, seller: Agent, service_id) -> Service:
    """The seller's own service, in any state; another's, listed or not, is 404 `service_not_found` as an id nobody
    has (before anything is asked of the chain for it)."""
    service = services_of_seller(seller=seller).filter(pk=service_id).first()
    if service is None:
        raise NotFound("No such service of yours.", code="service_not_found")
    return service


def service_only_of_seller(*, seller_id, buyer: Agent) -> Service:
    """The seller's one registered service, for a proposal that names only the seller (the Pægents SDK may); a
    seller hidden from `buyer` (`service_for_buyer`) has none."""
    found = list(_for_proposal(Service.objects.filter(
        _buyer_sees(buyer), seller_id=seller_id, state=ServiceState.REGISTERED))[:2])
    if not found:
        raise NotFound("The seller has no registered service.", code="service_not_found")
    if len(found) > 1:
        raise InvalidInput("The seller has several services: give service_id.", code="service_id_required")
    return found[0]


def registry_services(*, viewer: Agent, seller_wallet: str | None = None) -> QuerySet[Service]:
    """The Masumi registry: every registered service of the network whose seller and its owner are active (as search
    lists them), and the viewer's own in any state; `seller_wallet` narrows it to the sellers that proved that wallet
    theirs (an agent's own registrations: its wallet, proven or not): an agent merely naming another's wallet is
    not listed as that wallet's."""
    services = Service.objects.filter(LISTED | Q(seller=viewer))
    if seller_wallet is not None:
        services = services.filter(Q(seller__wallet_proven_at__isnull=False) | Q(seller=viewer),
                                   seller__wallet_address__iexact=seller_wallet)
    return _with_relations(services)


def _buyer_sees(buyer: Agent) -> Q:
    return LISTED | Q(seller__owner_id=buyer.owner_id)


def service_for_buyer(*, service_id, buyer: Agent) -> Service:
    """A service to buy: listed, or one of an agent of the buyer's own owner in any state (the proposal's rules then
    say why it cannot be bought: deregistered, seller deactivated). Another owner's deregistered or hidden service is
    404 `service_not_found`, as an id nobody has: saying why would tell anyone which ids are services and which
    sellers were deactivated."""
    service = _for_proposal(Service.objects.filter(_buyer_sees(buyer), pk=service_id)).first()
    if service is None:
        raise NotFound("No such service.", code="service_not_found")
    return service


def services_of_seller(*, seller: Agent) -> QuerySet[Service]:
    return _with_relations(Service.objects.filter(seller=seller))


def skill_get(*, handle: str, skill_name: str) -> Skill:
    """A registered skill of an active agent of an active owner, named by its ID, as the Services API seed allows, or
    its handle. The ID first: the platform assigns it, while a handle is chosen (one spelling another agent's ID,
    registered before they were refused, must not take that agent's calls)."""
    skills = Skill.objects.select_related("service", "service__seller").filter(
        service__seller__is_active=True, service__seller__owner_is_active=True, name=skill_name,
        service__state=ServiceState.REGISTERED)
    skill = None
    if (agent_id := uuid_or_none(handle)) is not None:
        skill = skills.filter(service__seller_id=agent_id).first()
        if skill is None and Agent.objects.filter(pk=agent_id).exists():
            # That agent's name, whatever skills it has: never the handle of another that spells it.
            raise NotFound("No such agent or skill.", code="skill_not_found")
    if skill is None:
        skill = skills.filter(service__seller__handle=handle).first()
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

# Quoted phrases, -exclusions and `or` (PostgreSQL's websearch syntax) ask for exactly that: no fuzzy matching then.
_WEBSEARCH_SYNTAX = re.compile(r'"|(?:^|\s)-\S|(?:^|\s)or(?:\s|$)', re.IGNORECASE)


def _exact_matches(search: ServiceSearch, services: "_Filtered", text: str) -> "_Filtered":
    """The services of `services` (the visible ones within `search`'s filters) matching every word of `text`,
    scored by their relevance."""
    if connection.vendor != "postgresql":
        # The embedded SQLite default: every word must appear somewhere; name hits rank first (1.0, else 0.5).
        matched = services
        for word in text.split():
            pattern = _contains(word)
            matched = matched.where(f"({_icontains('s.name')} OR {_icontains('s.keywords')} OR "
                                    f"{_icontains('s.description')})", pattern, pattern, pattern)
        return matched.scored(f"CASE WHEN {_icontains('s.name')} THEN 1.0 ELSE 0.5 END", _contains(text))
    _negations_nested_within_bound(text)
    query = _text_query(text)
    if not query.tsquery:
        return services.where("1 = 0").scored("0.0")  # only stop words or punctuation: nothing can match
    if _only_text(search) and _PLAIN_TSQUERY.fullmatch(query.tsquery) and \
            len(query.scored_lexemes) <= _POSTINGS_MAX_LEXEMES:  # what the postings can answer
        return _postings_matching(query.scored_lexemes)
    # Full-text match over the weighted vector (name A, tags/capability/skills B, description C) through its GIN
    # index, scored as the postings score it.
    scores = ["ts_rank(s.search_vector, %s::tsquery)::double precision" for _ in query.scored_lexemes]
    return services.where(f"s.search_vector @@ {_TEXT_QUERY}", text).scored(_relevance(scores),
                                                                             *query.scored_lexemes)


def _relevance(scores: list[str]) -> str:
    """A text match's relevance: the mean of the scores of the query's words (each ts_rank of the service's vector
    for that word alone: a name match above a tag match above a description match, repeats adding less and less),
    0 to 1. The same sum in the same order on every path, as double precision: cursors carry the relevance of the
    last row, and a double round-trips exactly through the cursor (a real, printed in its shortest form, did not,
    and rows tied on relevance were served again and again).

    Not ts_rank of the whole query: for words that must all match it weighs how close they stand, which can only be
    computed from each match's positions (at 100,000 services, parsing them back into a tsvector was most of the
    text query's time), while each word's score is a number the postings keep (migration 0012)."""
    if not scores:
        return "0.0"  # nothing to weigh: only excluded words
    return f"(({' + '.join(scores)}) / {len(scores)})"


_TEXT_QUERY = "websearch_to_tsquery('english'::regconfig, %s)"
# A lexeme as tsquery's text form quotes it (a quote or backslash doubled), which is how tsvector's reads it too.
_TSQUERY_LEXEME = re.compile(r"'(?:[^'\\]|''|\\.)*'")
# Every lexeme required, nothing else (no phrase, negation, alternative, weight or prefix): plain words.
_PLAIN_TSQUERY = re.compile(rf"{_TSQUERY_LEXEME.pattern}(?: & {_TSQUERY_LEXEME.pattern})*")
# The postings of each lexeme are one more table in the join; past PostgreSQL's from_collapse_limit (8) the planner
# stops ordering the joins as a whole. So many words match few services, which the GIN index finds cheaply anyway.
_POSTINGS_MAX_LEXEMES = 8


def _negations_nested_within_bound(text: str) -> None:
    """400 `query_too_complex` for a text PostgreSQL's web-search syntax cannot take (`marketplace.text_search`)."""
    if text_search.negations_nest_too_deep(text):
        raise InvalidInput(f"q: at most {text_search.NESTED_NEGATIONS_MAX} exclusion marks (-) between two words.",
                           code="query_too_complex", details={"field": "q", "max": text_search.NESTED_NEGATIONS_MAX})


@dataclass(frozen=True)
class _TextQuery:
    tsquery: str  # PostgreSQL's query in its text form; empty when the text holds only stop words or punctuation
    scored_lexemes: tuple[str, ...]  # each lexeme a match can hold (not an excluded one), once, quoted as in tsquery


@functools.lru_cache(maxsize=4096)
def _text_query(text: str) -> _TextQuery:
    """PostgreSQL's query for `text` (websearch syntax, English configuration): a function of the text alone, so
    asked once per process for each text (searches repeat; a round trip was ~0.5 ms of CPU). Its scored lexemes
    are those of `querytree`, the query without what it excludes."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT query::text, querytree(query) FROM {_TEXT_QUERY} AS query", [text])
        tsquery, positive = cursor.fetchone()
    return _TextQuery(tsquery=tsquery, scored_lexemes=tuple(dict.fromkeys(_TSQUERY_LEXEME.findall(positive))))


def _postings_matching(lexemes: tuple[str, ...]) -> "_Filtered":
    """The visible services whose vector holds every one of `lexemes` (quoted, as in tsquery's text), from their
    postings (migration 0011): one index-only scan per lexeme, merge-joined on the service, each match scored from
    its postings' scores (migration 0012)."""
    table = connection.ops.quote_name(SERVICE_POSTINGS_TABLE)
    aliases = [f"p{i}" for i in range(len(lexemes))]
    joins = " AND ".join([f"{alias}.service_id = p0.service_id" for alias in aliases[1:]] +
                         [f"{alias}.lexeme = %s" for alias in aliases])
    relevance = _relevance([f"{alias}.score::double precision" for alias in aliases])
    # Scored once per match in a subquery of its own (OFFSET 0 keeps PostgreSQL from merging it into the statement,
    # which would score each match again in each of a cursor's comparisons).
    source = (f"(SELECT p0.created_at, p0.unit_price, p0.service_id, {relevance} AS score "
              f"FROM {', '.join(f'{table} {alias}' for alias in aliases)} WHERE {joins} OFFSET 0) s")
    return _Filtered(source=source, source_params=tuple(map(_unquoted, lexemes)),
                     sort_columns=_DENORMALISED_SORT_COLUMNS, plan=_Plan.GENERIC).scored("s.score")


def _only_text(search: ServiceSearch) -> bool:
    """Whether `search` has no filter, only text (and an order): what the postings and visible names can answer."""
    return replace(search, text="", order_by="") == ServiceSearch()


def _unquoted(lexeme: str) -> str:
    return re.sub(r"''|\\(.)", lambda escaped: escaped.group(1) or "'", lexeme[1:-1])


def _contains(text: str) -> str:
    return f"%{connection.ops.prep_for_like_query(text)}%"


def _icontains(column: str) -> str:
    return f"{connection.ops.lookup_cast('icontains', 'CharField') % column} {connection.operators['icontains']}"


def _names_spelt_alike(search: ServiceSearch, services: "_Filtered", text: str) -> "_Filtered":
    """The services of `services` (the visible ones within `search`'s filters) whose name is spelt like `text`,
    scored by name similarity: the fallback when nothing matches every word (probably a misspelling). On PostgreSQL
    the page's statement matches the names itself (`catalog_names_spelt_alike`, migrations 0013 and 0014)."""
    if connection.vendor != "postgresql":
        return _names_spelt_alike_in_python(services, text)
    # Names containing something spelt alike: pg_trgm word similarity (`%>`, served by the trigram GIN index), so one
    # misspelt word finds a long name too. Only as a fallback: OR-ing fuzzy matches into every query made common
    # queries ~7x slower at 100k services (similarity rechecked on thousands of rows) and let them slip past quoted
    # phrases and -exclusions. Ranked by the mean of word similarity and whole-name similarity, so the tightest
    # name comes first.
    # Matched among the distinct names (ServiceName), each scored once, and the services then read by name: the
    # same services and scores as matching and scoring every service's name, which at 100,000 services (14,000
    # distinct names) cost 40 ms in the trigram index and as much again scoring 1,300 rows. The match is a function
    # with its own settings (migrations 0013 and 0014) that the page's statement calls: one statement.
    if _only_text(search):
        # The visible services by name (migration 0011): an index-only scan, not a heap page of each service.
        services = _Filtered(source=f"{connection.ops.quote_name(VISIBLE_SERVICE_NAMES_TABLE)} s",
                             sort_columns=_DENORMALISED_SORT_COLUMNS, plan=_Plan.PREPARED)
    # The names come as a relation sorted by score (an IN list of 200 names took 5 ms to plan), each probing the name
    # index. Sorted, so that a page by relevance reads only its best names' services: an incremental sort of each
    # score's services, which stops once the page is full (at 100,000 services, 4 of 205 names' 18 services instead
    # of all 1,307 sorted by a lookup of each one's score: 1.3 against 4.0 ms).
    return replace(services, source=f"{_NAMES_BY_SCORE} alike, {services.source}",
                   source_params=(text, *services.source_params)).where("s.name = alike.name").scored("alike.score")


NAMES_SPELT_ALIKE_FUNCTION = "catalog_names_spelt_alike"
_NAMES_BY_SCORE = f"(SELECT name, score FROM {NAMES_SPELT_ALIKE_FUNCTION}(%s) ORDER BY score DESC)"


def names_spelt_alike_plan(text: str, *, analyze: bool = False) -> str:
    """PostgreSQL's plan for the lexicon's match of `text` as `catalog_names_spelt_alike` runs it (its body, under
    its own settings), for the plan tests and bench/catalog_search.py --explain: EXPLAIN of a statement shows a
    function's call, not the plan of what the function runs. The settings are restored afterwards."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT proconfig, prosrc FROM pg_proc WHERE proname = %s", [NAMES_SPELT_ALIKE_FUNCTION])
        configured, body = cursor.fetchone()
        match = body[body.index("SELECT"):body.rindex(")")]  # RETURN QUERY (<the match>);
        own = dict(setting.split("=", 1) for setting in configured)
        cursor.execute("SELECT " + ", ".join(["current_setting(%s, true)"] * len(own)), list(own))
        before = dict(zip(own, cursor.fetchone(), strict=True))
        try:
            for name, value in own.items():
                cursor.execute("SELECT set_config(%s, %s, false)", [name, value])
            cursor.execute(f"EXPLAIN {'(ANALYZE, BUFFERS) ' if analyze else ''}"
                           f"{match.replace('%', '%%').replace('$1', '%s')}", [text] * match.count("$1"))
            return "\n".join(row[0] for row in cursor.fetchall())
        finally:
            for name, value in before.items():  # None: pg_trgm's setting, before pg_trgm was loaded
                cursor.execute("SELECT set_config(name, COALESCE(%s, reset_val), false) FROM pg_settings "
                               "WHERE name = %s", [value, name])


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


def _names_spelt_alike_in_python(statement: "_Filtered", text: str) -> "_Filtered":
    """The typo-tolerant fallback where the database has no trigram matching: names compared in Python (difflib)
    over the newest SQLITE_FUZZY_CANDIDATES candidates, scored like PostgreSQL's."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT s.id, s.name {statement.sql} ORDER BY s.created_at DESC LIMIT %s",
                       [*statement.params, SQLITE_FUZZY_CANDIDATES])
        candidates = cursor.fetchall()
    scores = {pk: score for pk, name in candidates if (score := name_similarity(text, name)) > 0}
    if not scores:
        return statement.where("1 = 0").scored("0.0")
    each = ", ".join(["%s"] * len(scores))
    return statement.where(f"s.id IN ({each})", *scores).scored(
        f"CASE s.id {' '.join(['WHEN %s THEN %s'] * len(scores))} ELSE 0.0 END",
        *[value for pk, score in scores.items() for value in (pk, score)])


@dataclass(frozen=True)
class OffsetPage:
    results: list  # as the API writes them (`_page_rows`)
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
    """A SELECT written once from the models' metadata, and the converters the ORM applies to its columns."""

    sql: str  # with `{ids}` where the page's service ids go
    converting: tuple[tuple, ...]  # (position, column expression, converters) of each column that has converters


def _columns(model, fields: tuple[str, ...]) -> tuple[list[str], str, tuple[tuple, ...]]:
    """The columns of `fields` of `model` (alias t0; a name with `__` follows a foreign key, one level), the joins
    they need and the converters the ORM applies to them (position, column expression, converters)."""
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
        if converters_of_column := connection.ops.get_db_converters(column) + field.get_db_converters(connection):
            converters.append((len(columns) - 1, column, tuple(converters_of_column)))
    join_sql = " ".join(
        f"JOIN {quote(relation.related_model._meta.db_table)} {alias} ON {alias}."
        f"{quote(relation.target_field.column)} = t0.{quote(relation.column)}" for alias, relation in joins.values())
    return columns, join_sql, tuple(converters)


def _statement(model, fields: tuple[str, ...], *, key: str, order_by: str | None = None) -> _Statement:
    """SELECT `fields` of `model` (a name with `__` follows a foreign key, one level) WHERE `key` IN the page's ids,
    ordered by `order_by` (one of `fields`)."""
    quote = connection.ops.quote_name
    columns, join_sql, converters = _columns(model, fields)
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


@dataclass(frozen=True)
class _PageRead:
    """PostgreSQL's read of a page with its keys (`_page_rows`), written once from the models' metadata: per row
    the narrow statement's sort values, then the result's JSON text (`_result_json_sql`)."""

    result_json: str
    service_table: str
    service_key: str
    joins: str

    def sql(self, page: str, *, sort_values: str, key: str, order: str) -> str:
        """The rows of the narrow page statement `page` (subquery `k`, whose `key` is the service's), in `order`:
        its `sort_values`, then the result's JSON text."""
        return (f"SELECT {sort_values}, {self.result_json} FROM ({page}) k "  # noqa: S608
                f"JOIN {self.service_table} t0 ON t0.{self.service_key} = {key} {self.joins} ORDER BY {order}")


@functools.cache
def _page_read() -> _PageRead:
    quote = connection.ops.quote_name
    columns, joins, _ = _columns(Service, _SEARCH_RESULT_FIELDS)
    return _PageRead(result_json=_result_json_sql(dict(zip(_SEARCH_RESULT_FIELDS, columns, strict=True))),
                     service_table=quote(Service._meta.db_table), service_key=quote(Service._meta.pk.column),
                     joins=joins)


# --- A result as the API writes it -------------------------------------------------------------------------------
# What catalog.serializers.ServiceSearchResultSerializer declares, written once here in two forms held to each other
# and to DRF's rendering of those fields (tests/catalog/test_search_results.py): in PostgreSQL, which writes a page's
# results as JSON text in the statement that reads them (`_result_json_sql`: reading each column into Python values,
# decoding the JSON ones and building each result's dict was half of a search's CPU in the web server), and in
# Python for SQLite (`_represented`). The text is the API's JSON (compact, UTF-8, keys in this order), but for the
# spacing inside the services' own JSON values (author, legal, example outputs, capabilities, metadata), which
# PostgreSQL writes as it stores them: the same values.


def _represented(row: dict) -> dict:
    """A result row (`_result_rows`: plain values) as the API writes it."""
    service_id, seller_id, unit_price, checked_at = row["id"], row["seller_id"], row["unit_price"], \
        row["availability_checked_at"]
    zone = timezone.get_current_timezone()
    result = {
        "id": str(service_id),
        "seller": {"id": str(seller_id), "handle": row["seller__handle"],
                   "display_name": row["seller__display_name"], "wallet_address": row["seller__wallet_address"]},
        "name": row["name"], "description": row["description"], "tags": row["tags"],
        "capability": {"name": row["capability_name"], "version": row["capability_version"]},
        "author": row["author"], "legal": row["legal"], "example_outputs": row["example_outputs"],
        "pricing": {"type": row["pricing_type"], "unit_name": row["unit_name"], "unit_price_atomic": unit_price,
                    "token": row["token"]},
        "upstream_protocol": row["upstream_protocol"], "masumi_protocol_version": row["masumi_protocol_version"],
        "skills": [{"name": skill["name"], "description": skill["description"], "price_atomic": skill["price"],
                    "path": skill["path"], "is_async": skill["is_async"],
                    "timeout_seconds": skill["timeout_seconds"]} for skill in row["skills"]],
        "state": row["state"], "availability": row["availability"],
        "availability_checked_at": None if checked_at is None else _iso8601(checked_at, zone),
        "category": row["category"], "min_quantity": row["min_quantity"], "max_quantity": row["max_quantity"],
        "capabilities": row["capabilities"], "metadata": row["metadata"],
        "created_at": _iso8601(row["created_at"], zone), "updated_at": _iso8601(row["updated_at"], zone),
        "service_id": str(service_id), "agent_id": str(seller_id), "service_name": row["name"],
        "price_model": row["pricing_type"], "unit": row["unit_name"], "base_price_cents": cents_of(unit_price),
        "is_active": row["state"] == ServiceState.REGISTERED,
    }
    if "relevance" in row:
        result["relevance"] = float(row["relevance"])
    return result


def _iso8601(value: datetime, zone) -> str:
    """An aware datetime as DRF's DateTimeField renders it in the current time zone `zone` (read once per answer
    rather than once per value)."""
    text = value.astimezone(zone).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _result_json_sql(columns: dict[str, str]) -> str:
    """The JSON text of a result as `_represented` writes it, without its closing brace (`_result_json` adds the
    relevance, a float written as the API writes floats), from `columns` (the column of each _SEARCH_RESULT_FIELDS).
    Times are written in UTC, the API's time zone (settings.TIME_ZONE; the tests hold the two forms to each other)."""
    quote = connection.ops.quote_name
    registered = ServiceState.REGISTERED.value
    if not re.fullmatch(r"\w+", registered):
        raise ImproperlyConfigured(f"a service state written into SQL must be a word: {registered!r}")

    def value(expression: str) -> str:
        return f"COALESCE(to_json({expression})::text, 'null')"

    def time(expression: str) -> str:
        # Python's isoformat: microseconds only when there are any, all six digits then.
        return (f"COALESCE('\"' || to_char({expression} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') || "
                f"CASE WHEN date_trunc('second', {expression}) = {expression} THEN '' "
                f"ELSE to_char({expression} AT TIME ZONE 'UTC', '.US') END || 'Z\"', 'null')")

    def members(pairs: list[tuple[str, str]], *, close: bool = True) -> str:
        # `concat` and not `||`: a value is never NULL here (each is written 'null'), and concat takes them all.
        parts = []
        for position, (name, expression) in enumerate(pairs):
            parts += [f"'{',' if position else '{'}\"{name}\":'", expression]
        if close:
            parts.append("'}'")
        return f"concat({', '.join(parts)})"

    column = {name: value(expression) for name, expression in columns.items()}
    service_key = f"t0.{quote(Service._meta.pk.column)}"
    tag_link, tag_name = Service.tags.through, quote(Tag._meta.get_field("name").column)
    tags = (f"COALESCE((SELECT '[' || string_agg(to_json(tag.{tag_name})::text, ',' ORDER BY tag.{tag_name}) || ']' "
            f"FROM {quote(tag_link._meta.db_table)} st JOIN {quote(Tag._meta.db_table)} tag "
            f"ON tag.{quote(Tag._meta.pk.column)} = st.{quote(tag_link._meta.get_field('tag').column)} "
            f"WHERE st.{quote(tag_link._meta.get_field('service').column)} = {service_key}), '[]')")

    def skill(name: str) -> str:
        return value(f"sk.{quote(Skill._meta.get_field(name).column)}")

    skill_json = members([("name", skill("name")), ("description", skill("description")),
                          ("price_atomic", skill("price")), ("path", skill("path")),
                          ("is_async", skill("is_async")), ("timeout_seconds", skill("timeout_seconds"))])
    skill_name = f"sk.{quote(Skill._meta.get_field('name').column)}"
    skills = (f"COALESCE((SELECT '[' || string_agg({skill_json}, ',' ORDER BY {skill_name}) || ']' "
              f"FROM {quote(Skill._meta.db_table)} sk "
              f"WHERE sk.{quote(Skill._meta.get_field('service').column)} = {service_key}), '[]')")
    price = columns["unit_price"]
    cents = f"CASE WHEN mod({price}, {CENTS}) = 0 THEN div({price}, {CENTS})::text ELSE 'null' END"
    return members([
        ("id", column["id"]),
        ("seller", members([("id", column["seller_id"]), ("handle", column["seller__handle"]),
                            ("display_name", column["seller__display_name"]),
                            ("wallet_address", column["seller__wallet_address"])])),
        ("name", column["name"]), ("description", column["description"]), ("tags", tags),
        ("capability", members([("name", column["capability_name"]), ("version", column["capability_version"])])),
        ("author", column["author"]), ("legal", column["legal"]), ("example_outputs", column["example_outputs"]),
        ("pricing", members([("type", column["pricing_type"]), ("unit_name", column["unit_name"]),
                             ("unit_price_atomic", column["unit_price"]), ("token", column["token"])])),
        ("upstream_protocol", column["upstream_protocol"]),
        ("masumi_protocol_version", column["masumi_protocol_version"]), ("skills", skills),
        ("state", column["state"]), ("availability", column["availability"]),
        ("availability_checked_at", time(columns["availability_checked_at"])),
        ("category", column["category"]), ("min_quantity", column["min_quantity"]),
        ("max_quantity", column["max_quantity"]), ("capabilities", column["capabilities"]),
        ("metadata", column["metadata"]), ("created_at", time(columns["created_at"])),
        ("updated_at", time(columns["updated_at"])), ("service_id", column["id"]), ("agent_id", column["seller_id"]),
        ("service_name", column["name"]), ("price_model", column["pricing_type"]), ("unit", column["unit_name"]),
        ("base_price_cents", cents), ("is_active", f"to_json({columns['state']} = '{registered}')::text"),
    ], close=False)


def _result_json(text: str, score: float | None) -> orjson.Fragment:
    """A result's JSON text from `_result_json_sql`, closed, with its relevance when ranked."""
    if score is None:
        return orjson.Fragment(text + "}")
    return orjson.Fragment(f"{text},\"relevance\":{orjson.dumps(float(score)).decode()}}}")


def _read(statement: _Statement, params: list) -> list[list]:
    """The rows of `statement` for the page's ids (`params`), each value converted as the ORM converts it."""
    with connection.cursor() as cursor:
        cursor.execute(statement.sql.format(ids=", ".join(["%s"] * len(params))), params)
        return [_converted(list(row), statement.converting) for row in cursor.fetchall()]


def _converted(values: list, converting: tuple[tuple, ...]) -> list:
    """`values` with each (position, column expression, converters) of `converting` converted as the ORM would."""
    for position, column, converters in converting:
        for convert in converters:
            values[position] = convert(values[position], column, connection)
    return values


def _result_rows(keys: list[dict], score: str | None) -> list[dict]:
    """The services of `keys` (the page's narrow rows, in page order) as plain values with their seller, tags (by
    name), skills (by name) and, when ranked, their relevance (the keys' `score`). Values, not model instances:
    building and serializing instances with their related managers was most of the CPU of answering a page."""
    if not keys:
        return []
    ids = [key["id"] for key in keys]
    params = [Service._meta.pk.get_db_prep_value(service_id, connection) for service_id in ids]
    services, tag_links, skill_rows = _search_result_statements()
    rows = {values[0]: dict(zip(_SEARCH_RESULT_FIELDS, values, strict=True)) for values in _read(services, params)}
    tags: dict = {service_id: [] for service_id in ids}
    for service_id, tag in _read(tag_links, params):
        tags[service_id].append(tag)
    skills: dict = {service_id: [] for service_id in ids}
    for service_id, *values in _read(skill_rows, params):
        skills[service_id].append(dict(zip(_SEARCH_RESULT_SKILL_FIELDS, values, strict=True)))
    page = []
    for key in keys:
        row = rows[key["id"]]
        row["tags"], row["skills"] = tags[key["id"]], skills[key["id"]]
        if score:
            row["relevance"] = key[score]
        page.append(row)
    return page


class _Plan(enum.Enum):
    """How PostgreSQL plans the statements of a search's `_Filtered` (`_cursor`, `_page_rows`)."""

    # For the search's values, at every search (Django's cursor): a filtered read of the services. Prepared, such a
    # statement may get a plan PostgreSQL makes for no values in particular, which it keeps after five runs: that
    # plan read a page of services by price with two tags in 3.8 s instead of 2.4 ms (bench/HISTORY.md,
    # twenty-first session).
    PER_SEARCH = "per search"
    # Prepared on the server, planned as PostgreSQL chooses: the visible names', whose plan is the same for any
    # values (every match read, then sorted). Not on the generic plan: their match function's own statements would
    # follow the setting.
    PREPARED = "prepared"
    # Prepared, and the page run on the generic plan (`_fetch_on_generic_plan`): the postings'. Planned for its values,
    # a three-word page probed the third word's postings once per match of the first two (1,396 probes) instead of
    # merging the three lists: 4.0 ms of PostgreSQL's CPU instead of 2.05.
    GENERIC = "generic"


@dataclass(frozen=True)
class _Filtered:
    """The FROM and WHERE of a search's statement (services `s` of active sellers `a`, or the postings `s` of
    visible services) with their parameters, the columns its results are sorted on, and the score they are ranked by
    (an SQL expression with its own parameters), if any. Written as SQL rather than compiled from a queryset:
    building and compiling the queryset cost more CPU than PostgreSQL spent running it."""

    source: str  # the FROM list
    sort_columns: dict[str, str]  # created_at, unit_price and id of a result, as `_SERVICE_SORT_COLUMNS`
    source_params: tuple = ()
    conditions: tuple[str, ...] = ()
    condition_params: tuple = ()
    score: str | None = None
    score_params: tuple = ()
    plan: _Plan = _Plan.PER_SEARCH  # how PostgreSQL plans its statements

    def where(self, condition: str, *params) -> "_Filtered":
        return replace(self, conditions=(*self.conditions, condition), condition_params=(*self.condition_params,
                                                                                       *params))

    def scored(self, score: str, *params) -> "_Filtered":
        return replace(self, score=score, score_params=params)

    @property
    def sql(self) -> str:
        return f"FROM {self.source}" + (f" WHERE {' AND '.join(self.conditions)}" if self.conditions else "")

    @property
    def params(self) -> list:
        return [*self.source_params, *self.condition_params]


# The columns a search is ordered by (a score, relevance or name similarity, is the statement's own), over services
# and over the postings or visible names (catalog.models.SERVICE_POSTINGS_TABLE, VISIBLE_SERVICE_NAMES_TABLE).
# Their keys are Service's fields, in the order `_keys` reads them.
_SERVICE_SORT_COLUMNS = {"created_at": "s.created_at", "unit_price": "s.unit_price", "id": "s.id"}
_DENORMALISED_SORT_COLUMNS = {"created_at": "s.created_at", "unit_price": "s.unit_price", "id": "s.service_id"}


def _services_and_sellers() -> _Filtered:
    """Services `s` and their sellers `a`, before any condition."""
    quote = connection.ops.quote_name
    return _Filtered(source=f"{quote(Service._meta.db_table)} s JOIN {quote(Agent._meta.db_table)} a "
                            f"ON a.{quote(Agent._meta.pk.column)} = s.{quote(Service._meta.get_field('seller').column)}",
                     sort_columns=_SERVICE_SORT_COLUMNS)


def _visible_services(search: ServiceSearch) -> _Filtered:
    """Registered services of active sellers of active owners (a Masumi service that said it cannot take jobs is left
    out until its next availability check says it can), within the search's filters. The postings and visible names
    hold exactly the services this rule lets through (catalog_service_postings_write, migrations 0011 and 0017): a
    change to it is a migration there too. The owner's activity is read from the seller's row (`owner_is_active`),
    not by joining the owners."""
    found = _services_and_sellers().where("s.state = %s", ServiceState.REGISTERED).where(
        "a.is_active = %s", True).where("a.owner_is_active = %s", True).where(
        "s.availability <> %s", Availability.UNAVAILABLE)
    quote = connection.ops.quote_name
    # Tag names to ids first (one small read): a tag nobody uses means no results, and the filters below are
    # semi-joins on the (service, tag) index with the ids as constants (matching the names inside the statement
    # made PostgreSQL join the tag table once per tag link of every candidate).
    tag_ids = _tag_ids({*search.tags_all, *search.tags_any})
    tag_link = quote(Service.tags.through._meta.db_table)
    for tag in search.tags_all:
        found = found.where(f"EXISTS (SELECT 1 FROM {tag_link} st WHERE st.service_id = s.id AND st.tag_id = %s)",
                            tag_ids.get(tag))
    if search.tags_any:
        known = [tag_ids[tag] for tag in search.tags_any if tag in tag_ids] or [None]
        found = found.where(f"EXISTS (SELECT 1 FROM {tag_link} st WHERE st.service_id = s.id AND st.tag_id IN "
                            f"({', '.join(['%s'] * len(known))}))", *known)
    if search.capability:
        found = found.where(f"{connection.ops.lookup_cast('iexact', 'CharField') % 's.capability_name'} "
                            f"{connection.operators['iexact'] % '%s'}",
                            connection.ops.prep_for_iexact_query(search.capability))
    price = _column_value("unit_price")
    if search.max_unit_price is not None:
        found = found.where("s.unit_price <= %s", price(search.max_unit_price))
    if search.min_unit_price is not None:
        found = found.where("s.unit_price >= %s", price(search.min_unit_price))
    if search.seller:
        found = found.where("a.handle = %s", search.seller)
    if search.protocol:
        found = found.where("s.upstream_protocol = %s", search.protocol)
    if search.skill:
        found = found.where(f"EXISTS (SELECT 1 FROM {quote(Skill._meta.db_table)} sk WHERE sk.service_id = s.id "
                            "AND sk.name = %s)", search.skill)
    if search.token:
        found = found.where("s.token = %s", search.token)
    if search.pricing_type:
        found = found.where("s.pricing_type = %s", search.pricing_type)
    return found


# Tag names to ids, per process: a search with tags read them in a round trip of its own on every request (at
# 100,000 services 0.5-0.7 ms of CPU per search, a twelfth of it). Only names found are kept: a new tag is found
# at once, a renamed or deleted one followed within CREDENTIAL_CACHE_SECONDS.
TAG_IDS = kept_for_a_second()
_TAG_IDS_LOCK = threading.Lock()


def _tag_ids(names: set[str]) -> dict[str, int]:
    with _TAG_IDS_LOCK:
        known = {name: tag_id for name in names if (tag_id := TAG_IDS.get(name)) is not None}
    missing = names - known.keys()
    if missing:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT name, id FROM {connection.ops.quote_name(Tag._meta.db_table)} "  # noqa: S608
                           f"WHERE name IN ({', '.join(['%s'] * len(missing))})", list(missing))
            found = dict(cursor.fetchall())
        with _TAG_IDS_LOCK:
            TAG_IDS.update(found)
        known.update(found)
    return known


def _column_value(name: str):
    """How a value of Service's field `name` is written as a statement's parameter."""
    field = Service._meta.get_field(name)
    return lambda value: field.get_db_prep_value(field.to_python(value), connection)


def service_search(*, search: ServiceSearch, cursor: str | None, limit: int,
                   offset: int | None = None) -> tuple[list, str | None] | OffsetPage:
    """A page of matching services as the API writes them (orjson.Fragment or dict, see `_result_json_sql`): after
    `cursor` (keyset), or from `offset` (the Pægents SDK's paging, with the total count) when an offset is given."""
    services = _visible_services(search)
    text = search.text.strip()
    order_by = search.order_by or ("relevance" if text else "newest")
    if order_by == "relevance" and not text:
        order_by = "newest"
    ordering = _ORDERINGS[order_by]
    page = functools.partial(_page, cursor=cursor, limit=limit, offset=offset)
    if not text:
        return page(services, ordering=ordering)
    # After the filters, so "nothing matches exactly" means nothing within them.
    exact = _exact_matches(search, services, text)
    if _WEBSEARCH_SYNTAX.search(text):
        return page(exact, ordering=ordering)
    if not cursor and not offset:
        # A first page says itself whether anything matches exactly (it is empty only when nothing does): one
        # statement, where asking first and then reading the page searched the index twice.
        found = page(exact, ordering=ordering)
        if found.results if isinstance(found, OffsetPage) else found[0]:
            return found
    elif cursor and order_by == "relevance" and cursor_issued_for(cursor, ordering=ordering):
        # A cursor of exact matches (names spelt alike are ranked on their own keys): their page, and only when it is
        # empty a second statement asking whether anything still matches exactly, where asking first cost every page
        # a round trip.
        found = page(exact, ordering=ordering)
        if found[0] or _exists(exact):
            return found
    elif _exists(exact):
        return page(exact, ordering=ordering)
    if order_by == "relevance":
        ordering = _FUZZY_RELEVANCE
    return page(_names_spelt_alike(search, services, text), ordering=ordering)


def _cursor(services: _Filtered):
    """A cursor for a statement reading `services`: prepared on the server, or Django's, which PostgreSQL plans for
    the values at every run (`_Plan`)."""
    return connection.cursor() if services.plan is _Plan.PER_SEARCH else prepared_cursor()


def _exists(services: _Filtered) -> bool:
    with _cursor(services) as cursor:
        cursor.execute(f"SELECT 1 {services.sql} LIMIT 1", services.params)  # noqa: S608
        return cursor.fetchone() is not None


def _page(services: _Filtered, *, ordering: list[str], cursor: str | None, limit: int,
          offset: int | None) -> tuple[list[dict], str | None] | OffsetPage:
    """A page of `services` in `ordering`, after `cursor` or from `offset`, as result rows with their score as
    relevance. The page is chosen by a narrow statement (the key, the sort values, the score), then its rows are
    read by key (on PostgreSQL in the same statement, `_keys_and_rows`): sorting thousands of text matches carried
    every column of each through the sort (about half of a text search's time in the database at 100,000
    services)."""
    score = "score" if services.score is not None else None
    if cursor:
        services = _after(services, ordering, cursor_values(cursor, ordering=ordering))
    columns = [*services.sort_columns.values(), *([f"{services.score} AS score"] if services.score else [])]
    params = [*services.score_params, *services.params]
    statement = (f"SELECT {', '.join(columns)} {services.sql} "  # noqa: S608
                 f"ORDER BY {_order(services.sort_columns, ordering)} LIMIT %s")
    if offset is None:
        results, last, more = _page_rows(statement, [*params, limit + 1], services, ordering=ordering, limit=limit,
                                         score=score)
        if not more:
            return results, None
        return results, cursor_after([last.get(field.lstrip("-"), last.get("score")) for field in ordering],
                                     ordering=ordering)
    results, _, more = _page_rows(f"{statement} OFFSET %s", [*params, limit + 1, offset], services, ordering=ordering,
                                  limit=limit, score=score)
    # A last page counts itself; only a page with more after it asks the database for the total.
    total = _count(services) if more or (offset and not results) else offset + len(results)
    return OffsetPage(results=results, total=total, next_offset=offset + limit if more else None)


def _order(sort_columns: dict[str, str], ordering: list[str]) -> str:
    """ORDER BY's list for `ordering` (fields, '-' for descending) over `sort_columns` and the score."""
    return ", ".join(f"{sort_columns.get(field.lstrip('-'), 'score')}{' DESC' if field.startswith('-') else ''}"
                     for field in ordering)


def _page_rows(statement: str, params: list, services: _Filtered, *, ordering: list[str], limit: int,
               score: str | None) -> tuple[list, dict | None, bool]:
    """The first `limit` rows `statement` (the narrow page statement of `_page` over `services`, which selects up to
    one more) selects, as results the API writes (orjson.Fragment or dict), with their score as relevance; the sort
    values (and score) of the last of them, for its cursor; and whether there are more. On PostgreSQL in one
    statement that writes the results too (`_result_json_sql`): the page's services, tags and skills read with their
    keys (four round trips were about a third of a page's CPU, in the server and in PostgreSQL), prepared on the
    server for the postings and visible names (`_Plan`: parsing and planning its several kB of SQL at every search
    were 15-20% of PostgreSQL's CPU per search); a row's sort values are then its service's own (the postings and
    visible names hold copies kept in step)."""
    if connection.vendor != "postgresql":
        keys = _keys(statement, params)
        results = [_represented(row) for row in _result_rows(keys[:limit], score)]
        return results, keys[len(results) - 1] if results else None, len(keys) > limit
    # The narrow statement's columns, as the subquery `k` names them (`s.service_id` is `k.service_id`).
    selected = {name: f"k.{column.split('.', 1)[1]}" for name, column in services.sort_columns.items()}
    sort_values = ", ".join([*selected.values(), *(["k.score"] if score else [])])
    page_sql = _page_read().sql(statement, sort_values=sort_values, key=selected["id"], order=_order(selected, ordering))
    # Inside the caller's transaction (a test's, an atomic view's) the page cannot have one of its own: planned as
    # PostgreSQL chooses, the same rows.
    if services.plan is _Plan.GENERIC and not connection.in_atomic_block:
        found = _fetch_on_generic_plan(page_sql, params)
    else:
        with _cursor(services) as cursor:
            cursor.execute(page_sql, params)
            found = cursor.fetchall()
    page = found[:limit]
    results = [_result_json(row[-1], row[-2] if score else None) for row in page]
    return results, _key(page[-1][:-1]) if page else None, len(found) > limit


def _fetch_on_generic_plan(sql: str, params: list) -> list[tuple]:
    """The rows of the prepared statement `sql`, run on PostgreSQL's generic plan (`_Plan.GENERIC`), in a
    transaction of its own that sets the plan cache's mode for itself alone: one round trip, a pipeline."""
    with transaction_in_pipelines() as (cursor, control, pipeline):
        with pipeline():
            control.execute("BEGIN")
            control.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            cursor.execute(sql, params)
            control.execute("COMMIT")
        return cursor.fetchall()


def _after(services: _Filtered, ordering: list[str], values: list) -> _Filtered:
    """Rows strictly after `values` in the lexicographic order `ordering` (fields, '-' for descending)."""
    expressions, prepared = [], []
    for sort, value in zip(ordering, values, strict=True):
        name = sort.lstrip("-")
        if name in services.sort_columns:
            expressions.append((services.sort_columns[name], ()))
            prepared.append(_column_value(name)(value))
        else:
            expressions.append((services.score, services.score_params))
            prepared.append(float(value))
    clauses, params = [], []
    for i, sort in enumerate(ordering):
        parts = []
        for (expression, expression_params), value in zip(expressions[:i], prepared[:i], strict=True):
            parts.append(f"{expression} = %s")
            params += [*expression_params, value]
        expression, expression_params = expressions[i]
        parts.append(f"{expression} {'<' if sort.startswith('-') else '>'} %s")
        params += [*expression_params, prepared[i]]
        clauses.append(f"({' AND '.join(parts)})")
    after = services.where(f"({' OR '.join(clauses)})", *params)
    first = ordering[0].lstrip("-")
    if first in services.sort_columns:
        # Implied by the clauses above; said apart, it is a range an index on the first sort field starts from,
        # instead of a filter on every row before the cursor (page 51 of the newest services read 1,000 rows for 21).
        after = after.where(f"{services.sort_columns[first]} {'<=' if ordering[0].startswith('-') else '>='} %s", prepared[0])
    return after


@functools.cache
def _key_converters() -> list[tuple]:
    """Per sort column, the column expression and the converters the ORM applies to its values."""
    converters = []
    for name in _SERVICE_SORT_COLUMNS:
        field = Service._meta.get_field(name)
        column = field.get_col("s")
        converters.append((name, column, connection.ops.get_db_converters(column) + field.get_db_converters(connection)))
    return converters


def _keys(statement: str, params: list) -> list[dict]:
    """The page's keys: each row's sort columns as the ORM reads them, and its score (when there is one)."""
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        rows = cursor.fetchall()
    return [_key(row) for row in rows]


def _key(row) -> dict:
    """A row of a page's keys (its sort columns, then its score when there is one) as the ORM reads them."""
    key = {}
    for value, (name, column, converters) in zip(row, _key_converters(), strict=False):
        for convert in converters:
            value = convert(value, column, connection)
        key[name] = value
    if len(row) > len(_SERVICE_SORT_COLUMNS):
        key["score"] = row[-1]
    return key


def _count(services: _Filtered) -> int:
    with _cursor(services) as cursor:
        cursor.execute(f"SELECT COUNT(*) {services.sql}", services.params)  # noqa: S608
        return cursor.fetchone()[0]
