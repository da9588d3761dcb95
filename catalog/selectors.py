"""Reads of the catalog."""

from dataclasses import dataclass, field
from functools import reduce
from operator import and_

from django.contrib.postgres.search import SearchQuery, SearchRank, TrigramSimilarity
from django.db import connection
from django.db.models import Case, F, FloatField, Q, QuerySet, Value, When

from catalog.models import Agent, ApiKey, Service, ServiceState, Skill
from marketplace.errors import NotFound
from marketplace.pagination import paginate

# Trigram similarity of the name adds fuzzy matching ("translte" finds "translate"); it weighs less than FTS.
_TRIGRAM_WEIGHT = 0.5


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


def service_get_any_state(*, service_id) -> Service:
    """A service whatever its state, for rules that must say why it cannot be used (e.g. deregistered)."""
    service = _with_relations(Service.objects.filter(pk=service_id)).first()
    if service is None:
        raise NotFound("No such service.", code="service_not_found")
    return service


def services_of_seller(*, seller: Agent) -> QuerySet[Service]:
    return _with_relations(Service.objects.filter(seller=seller))


def skill_get(*, handle: str, skill_name: str) -> Skill:
    skill = (
        Skill.objects.select_related("service", "service__seller")
        .filter(service__seller__handle=handle, service__seller__is_active=True, name=skill_name,
                service__state=ServiceState.REGISTERED)
        .first()
    )
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


def _match_text(queryset: QuerySet[Service], text: str) -> QuerySet[Service]:
    if connection.vendor == "postgresql":
        query = SearchQuery(text, search_type="websearch", config="english")
        return queryset.annotate(
            relevance=SearchRank(F("search_vector"), query) + _TRIGRAM_WEIGHT * TrigramSimilarity("name", text)
        ).filter(Q(search_vector=query) | Q(name__trigram_similar=text))
    # The embedded SQLite default: every word must appear somewhere; name hits rank first.
    words = text.split()
    matches = [Q(name__icontains=w) | Q(keywords__icontains=w) | Q(description__icontains=w) for w in words]
    return queryset.filter(reduce(and_, matches)).annotate(
        relevance=Case(When(name__icontains=text, then=Value(2.0)), default=Value(1.0), output_field=FloatField())
    )


def service_search(*, search: ServiceSearch, cursor: str | None, limit: int) -> tuple[list[Service], str | None]:
    services = Service.objects.filter(state=ServiceState.REGISTERED, seller__is_active=True)
    text = search.text.strip()
    if text:
        services = _match_text(services, text)
    for tag in search.tags_all:
        services = services.filter(tags__name=tag)
    if search.tags_any:
        services = services.filter(pk__in=Service.tags.through.objects.filter(
            tag__name__in=search.tags_any).values("service_id"))
    if search.capability:
        services = services.filter(capability_name__iexact=search.capability)
    if search.max_unit_price is not None:
        services = services.filter(unit_price__lte=search.max_unit_price)
    if search.seller:
        services = services.filter(seller__handle=search.seller)
    if search.protocol:
        services = services.filter(upstream_protocol=search.protocol)
    if search.skill:
        services = services.filter(skills__name=search.skill)
    if search.token:
        services = services.filter(token=search.token)
    if search.pricing_type:
        services = services.filter(pricing_type=search.pricing_type)
    order_by = search.order_by or ("relevance" if text else "newest")
    if order_by == "relevance" and not text:
        order_by = "newest"
    return paginate(_with_relations(services), ordering=_ORDERINGS[order_by], cursor=cursor, limit=limit)
