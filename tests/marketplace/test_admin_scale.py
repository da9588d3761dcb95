"""The operators' admin with many rows: each page asks the database as many statements with many rows as with few
(no statement per listed row), and no page lists every row of a big table in a form's select.
bench/admin_pages.py measures the same pages with 100,000 rows of each big table."""

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Exists, OuterRef, Q
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext

from agreements.models import (AgreementEvent, AgreementStatus, InvocationSellerFailure, PaymentAuthorization,
                               SkillInvocation, UsageAgreement, UsageEvent, WebhookDelivery, WebhookSubscription)
from bench.admin_pages import pages, rows_added
from catalog.models import Agent, Service, Skill
from escrow import selectors as escrow_selectors
from escrow.models import ChainEvent, ChainTransaction, Dispute, RelayRevert
from marketplace import dashboard
from marketplace.admin import IndexedSearch, KeysFirstPaginator
from policies import evaluation
from policies.models import ApprovalRequest

pytestmark = pytest.mark.django_db

FEW, MANY = 3, 40


def _statements(client, path: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    return len(queries.captured_queries)


def test_each_admin_page_asks_as_many_statements_with_many_rows_as_with_few(operator, django_assert_max_num_queries):
    owner = get_user_model().objects.create(username="rows-owner")
    rows_added(FEW, owner=owner)
    with_few = {name: _statements(operator, path) for name, path in pages()}

    rows_added(MANY, owner=owner, first=FEW)

    for name, path in pages():
        with django_assert_max_num_queries(with_few[name], info=name):
            assert operator.get(path).status_code == 200, name


def test_the_policy_add_page_lists_no_agent_in_a_select(operator):
    """A policy's agent was a select of every agent: with 20,000 agents the page took 6 s and megabytes to draw. It
    is the agent's id, with Django's lookup (raw_id_fields)."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))

    page = operator.get("/admin/policies/policy/add/").content.decode()

    assert 'name="agent"' in page and '<select name="agent"' not in page
    assert not any(str(agent.pk) in page for agent in Agent.objects.all())


BIG_TABLES = [UsageAgreement, UsageEvent, PaymentAuthorization, SkillInvocation, ChainTransaction, Dispute, Service,
              # the tables that grow with traffic
              ChainEvent, WebhookDelivery, RelayRevert, InvocationSellerFailure, ApprovalRequest]


def _leads_an_index(model, column: str) -> bool:
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, model._meta.db_table)
    return any((c["index"] or c["unique"] or c["primary_key"]) and c["columns"] and c["columns"][0] == column
               for c in constraints.values())


# Tables that grow with agents, not traffic: a lookup in them (a host a webhook's URL is at) may read them whole.
SMALL_TABLES = [WebhookSubscription]


def _unindexed_steps(model, path: str) -> list[str]:
    """The columns a search along `path` compares or joins on that lead no index (a step in a small table aside)."""
    unindexed = []
    for name in path.removeprefix("@").split("__"):
        if model in SMALL_TABLES:
            break
        field = model._meta.pk if name == "pk" else model._meta.get_field(name)
        if field.is_relation and field.many_to_one or field.one_to_one and not field.auto_created:
            owner, column = model, field.column  # a forward key: joined on this table's column
        elif field.is_relation:
            owner, column = field.related_model, field.field.column  # a reverse one: on the other table's
        else:
            owner, column = model, field.column
        if not _leads_an_index(owner, column):
            unindexed.append(f"{owner._meta.db_table}.{column}")
        model = field.related_model or model
    return unindexed


@pytest.mark.parametrize("model", BIG_TABLES, ids=lambda model: model.__name__)
def test_every_search_of_a_big_table_reads_an_index(model):
    """Django's search is `icontains` on every search field (and through their joins): no index serves it, and a
    search of 100,000 agreements or invocations took 2-3 s (bench/admin_pages.py)."""
    model_admin = admin.site._registry[model]
    assert isinstance(model_admin, IndexedSearch)
    assert {path: _unindexed_steps(model, path) for path in model_admin.search_fields} == {
        path: [] for path in model_admin.search_fields}


def _found(client, changelist: str, term: str) -> list:
    response = client.get(changelist, {"q": term})
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


def test_a_big_tables_search_finds_a_row_by_a_whole_value_and_nothing_by_a_value_no_column_takes(operator):
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    agreement = UsageAgreement.objects.select_related("buyer").order_by("created_at").first()
    transaction = ChainTransaction.objects.get(agreement=agreement)
    invocation = SkillInvocation.objects.first()

    assert agreement in _found(operator, "/admin/agreements/usageagreement/", agreement.buyer.handle)
    assert _found(operator, "/admin/agreements/usageagreement/", str(agreement.pk)) == [agreement]
    assert _found(operator, "/admin/agreements/usageagreement/", f'"{agreement.pk.hex}"') == [agreement]
    assert _found(operator, "/admin/escrow/chaintransaction/", transaction.attempts.get().tx_hash.upper()) == [
        transaction]
    assert _found(operator, "/admin/agreements/skillinvocation/", str(invocation.pk)) == [invocation]
    assert len(_found(operator, "/admin/agreements/usageevent/", str(agreement.pk))) == UsageEvent.objects.filter(agreement=agreement).count() > 0
    for changelist in ["/admin/agreements/usageagreement/", "/admin/agreements/usageevent/",
                       "/admin/agreements/paymentauthorization/", "/admin/escrow/chaintransaction/"]:
        assert _found(operator, changelist, "not-an-id 99999999999999999999999") == []


@pytest.mark.parametrize("changelist", ["/admin/catalog/service/", "/admin/agreements/usageagreement/",
                                        "/admin/agreements/webhookdelivery/", "/admin/escrow/chainevent/",
                                        "/admin/policies/approvalrequest/"])
def test_a_big_tables_list_filters_read_no_column_of_every_row(operator, changelist):
    """A filter on a column without choices (a token, an event type) listed its values with `SELECT DISTINCT` over
    the whole table on every view of the list; it offers the values the code knows."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))

    with CaptureQueriesContext(connection) as queries:
        page = operator.get(changelist)

    assert page.status_code == 200
    assert [query["sql"] for query in queries.captured_queries if "SELECT DISTINCT" in query["sql"]] == []


def test_a_list_filtered_on_a_token_shows_the_rows_in_it(operator):
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))

    for token, listed in [("USDC", FEW), ("EURC", 0)]:
        page = operator.get("/admin/agreements/usageagreement/", {"token__exact": token})
        assert page.status_code == 200 and len(page.context["cl"].result_list) == listed


def test_the_approval_requests_filtered_by_rule_are_those_of_that_rule(operator):
    """The rule filter offers the rules the code names (policies.evaluation), those no request was held by yet too."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))  # held by the threshold

    page = operator.get("/admin/policies/approvalrequest/")
    offered = [choice["display"] for spec in page.context["cl"].filter_specs if spec.title == "rule"
               for choice in spec.choices(page.context["cl"])]
    assert offered == ["All", *evaluation.APPROVAL_RULES]
    seller_owners = ApprovalRequest.objects.order_by("created_at", "id")[:1]
    ApprovalRequest.objects.filter(pk__in=seller_owners).update(rule=evaluation.RULE_SET_BY_SELLER_OWNER)
    for rule, listed in [(evaluation.RULE_SET_BY_SELLER_OWNER, 1), (evaluation.RULE_APPROVAL_THRESHOLD, FEW - 1)]:
        page = operator.get("/admin/policies/approvalrequest/", {"rule__exact": rule})
        assert page.status_code == 200
        assert sorted(approval.rule for approval in page.context["cl"].result_list) == [rule] * listed


def test_the_agents_list_counts_the_services_of_the_agents_it_shows_only(operator):
    """Each agent's service count was a GROUP BY over every service of every agent, before the page was cut (1 s
    with 100,000 services): it is counted per listed agent."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    seller = Service.objects.first().seller

    with CaptureQueriesContext(connection) as queries:
        page = operator.get("/admin/catalog/agent/")

    assert [query["sql"] for query in queries.captured_queries if 'GROUP BY "catalog_agent"."id"' in query["sql"]] == []
    row = next(agent for agent in page.context["cl"].result_list if agent.pk == seller.pk)
    assert row._service_count == Service.objects.filter(seller=seller).count() > 0


BIG_LISTS = ["/admin/agreements/usageagreement/", "/admin/agreements/skillinvocation/",
             "/admin/escrow/chaintransaction/", "/admin/agreements/usageevent/", "/admin/escrow/chainevent/",
             "/admin/agreements/webhookdelivery/", "/admin/escrow/relayrevert/",
             "/admin/agreements/invocationsellerfailure/", "/admin/policies/approvalrequest/", "/admin/catalog/skill/"]


@pytest.mark.parametrize("changelist", BIG_LISTS)
def test_a_big_tables_list_reads_its_page_in_order_from_an_index(operator, changelist):
    """A list newest first sorted every row of the table for each page (0.2-0.4 s with 100,000 rows; a usage event's
    order, by its agreement's, joined the agreements too): the page is read in order from an index. Asked with
    sorting made as dear as PostgreSQL allows, so a plan that still sorts had no index to read."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    table = admin.site._registry[_model_of(changelist)].model._meta.db_table
    with CaptureQueriesContext(connection) as queries:
        assert operator.get(changelist).status_code == 200
    page = next(query["sql"] for query in queries.captured_queries
                if query["sql"].startswith("SELECT") and f'FROM "{table}"' in query["sql"] and "ORDER BY" in query["sql"])

    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_sort = off")
        cursor.execute(f"EXPLAIN {page.split(' LIMIT ')[0]} LIMIT 100")
        plan = "\n".join(line for (line,) in cursor.fetchall())

    assert "Sort" not in plan, (page, plan)


def _page_plan(client, path: str, table: str) -> tuple[str, str]:
    """The statement reading the page of `path`'s list from `table`, and its plan with sorting made as dear as
    PostgreSQL allows (a plan that still sorts had no index to read)."""
    with CaptureQueriesContext(connection) as queries:
        assert client.get(path).status_code == 200
    page = next(query["sql"] for query in queries.captured_queries
                if query["sql"].startswith("SELECT") and f'FROM "{table}"' in query["sql"] and "ORDER BY" in query["sql"])
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_sort = off")
        cursor.execute(f"EXPLAIN {page.split(' LIMIT ')[0]} LIMIT 100")
        return page, "\n".join(line for (line,) in cursor.fetchall())


@pytest.mark.parametrize("changelist", [*BIG_LISTS, "/admin/agreements/paymentauthorization/",
                                        "/admin/catalog/service/"])
def test_a_big_tables_list_sorted_by_any_column_it_offers_reads_its_page_from_an_index(operator, changelist):
    """A column's header sorts the list by it: sorted by deposit (or by what an agreement used, its buyer, its
    status), the list sorted every row of the table, joined to its agents and service, for each page (and the
    tie-break on the id ran against the column's direction, so even the creation time sorted when ascending). A big
    table's list offers to sort by the columns an index reads in order, either way."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    model_admin = admin.site._registry[_model_of(changelist)]
    table = model_admin.model._meta.db_table
    request = RequestFactory().get(changelist)
    request.user = get_user_model().objects.get(username="operator")
    columns = list(model_admin.get_changelist_instance(request).list_display)
    sortable = model_admin.get_sortable_by(request)
    for index, column in enumerate(columns):
        if column not in sortable or column == "action_checkbox":
            continue
        for order in (str(index), f"-{index}"):
            page, plan = _page_plan(operator, f"{changelist}?o={order}", table)
            assert "Sort" not in plan, (column, order, page, plan)


def test_the_agreements_sorted_by_deposit_are_in_the_deposits_order_whole_base_units(operator):
    """Sorted by its deposit column, the list orders by the base units the column shows (a uint256 beyond a float's
    precision among them), equal deposits by id the same way."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    smallest, largest, *equal = UsageAgreement.objects.order_by("id")
    UsageAgreement.objects.filter(pk=smallest.pk).update(deposit_amount=1)
    UsageAgreement.objects.filter(pk=largest.pk).update(deposit_amount=2**255 + 1)
    UsageAgreement.objects.filter(pk__in=[agreement.pk for agreement in equal]).update(deposit_amount=2**255)
    deposits = sorted(UsageAgreement.objects.values_list("deposit_amount", "id"))
    column = 1 + list(admin.site._registry[UsageAgreement].list_display).index("deposit_display")

    for order, expected in ((str(column), deposits), (f"-{column}", deposits[::-1])):
        listed = operator.get(f"/admin/agreements/usageagreement/?o={order}").context["cl"].result_list
        assert [(agreement.deposit_amount, agreement.id) for agreement in listed] == expected


def _model_of(changelist: str):
    app_label, model_name = changelist.strip("/").split("/")[1:3]
    return next(model for model in admin.site._registry if (model._meta.app_label, model._meta.model_name) == (
        app_label, model_name))


def test_the_lists_of_tables_that_grow_with_traffic_find_a_row_by_a_whole_value(operator):
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    event = ChainEvent.objects.order_by("block_number").first()
    delivery = WebhookDelivery.objects.select_related("subscription__agent").first()
    revert = RelayRevert.objects.select_related("transaction").first()
    failure = InvocationSellerFailure.objects.first()
    approval = ApprovalRequest.objects.first()

    assert _found(operator, "/admin/escrow/chainevent/", event.tx_hash.upper()) == [event]
    assert _found(operator, "/admin/escrow/chainevent/", str(event.agreement_id)) == [event]
    assert _found(operator, "/admin/agreements/webhookdelivery/", str(delivery.pk)) == [delivery]
    assert len(_found(operator, "/admin/agreements/webhookdelivery/", delivery.subscription.agent.handle)) == FEW
    assert len(_found(operator, "/admin/agreements/webhookdelivery/", "hooks0.example")) == FEW
    assert _found(operator, "/admin/escrow/relayrevert/", revert.wallet) == [revert]
    assert _found(operator, "/admin/escrow/relayrevert/", str(revert.transaction.agreement_id)) == [revert]
    assert _found(operator, "/admin/agreements/invocationsellerfailure/", failure.payer) == [failure]
    assert _found(operator, "/admin/agreements/invocationsellerfailure/", str(failure.invocation_id)) == [failure]
    assert _found(operator, "/admin/policies/approvalrequest/", str(approval.subject_id)) == [approval]


def _disputes_ever_by_every_agreements_events():
    """What `disputes_ever` listed before it read an index: an agreement disputed now, or with a challenge event."""
    challenged = AgreementEvent.objects.filter(agreement_id=OuterRef("pk"), to_status=AgreementStatus.DISPUTED)
    return Dispute.objects.filter(Q(status=AgreementStatus.DISPUTED) | Exists(challenged))


def _disputed_and_undisputed_agreements() -> None:
    """Of six agreements: one disputed now (its challenge event), one disputed with no event (a row written by
    hand, or an event lost), one settled after a dispute, one refunded after a dispute timed out, one whose
    events name other statuses only, one with no event."""
    rows_added(6, owner=get_user_model().objects.create(username="rows-owner"))
    open_, eventless, settled, timed_out, undisputed, _untouched = UsageAgreement.objects.order_by("created_at", "id")
    UsageAgreement.objects.filter(pk__in=[open_.pk, eventless.pk]).update(status=AgreementStatus.DISPUTED)
    UsageAgreement.objects.filter(pk__in=[settled.pk, timed_out.pk]).update(status=AgreementStatus.SETTLED)
    for agreement, steps in [(open_, [("active", "disputed")]),
                             (settled, [("active", "disputed"), ("disputed", "settling"), ("settling", "settled")]),
                             (timed_out, [("active", "disputed"), ("disputed", "settled")]),
                             (undisputed, [("active", "settling"), ("settling", "settled")])]:
        for from_status, to_status in steps:
            AgreementEvent.objects.create(agreement=agreement, actor_kind="system", from_status=from_status,
                                          to_status=to_status)


def test_the_disputes_ever_are_those_disputed_now_or_once(operator):
    _disputed_and_undisputed_agreements()

    expected = sorted(str(pk) for pk in _disputes_ever_by_every_agreements_events().values_list("pk", flat=True))
    assert len(expected) == 4
    assert sorted(str(dispute.pk) for dispute in escrow_selectors.disputes_ever()) == expected
    page = operator.get("/admin/escrow/dispute/", {"dispute": "all"})
    assert page.status_code == 200
    assert sorted(str(dispute.pk) for dispute in page.context["cl"].result_list) == expected


def test_the_disputes_ever_are_read_from_indexes():
    """"All" disputes looked up every agreement's events (an OR of the status and an EXISTS, no index serving
    both): 1.2 s with 100,000 agreements. Planned with scans made as dear as PostgreSQL allows, so a plan that
    still scans a table had no index to read."""
    _disputed_and_undisputed_agreements()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
    plan = escrow_selectors.disputes_ever().order_by("times_out_at", "pk").explain()

    assert "Seq Scan on agreements_usageagreement" not in plan, plan
    assert "Seq Scan on agreements_agreementevent" not in plan, plan


@pytest.mark.parametrize("table", ["agreements_usageagreement", "agreements_skillinvocation"])
def test_the_dashboards_volume_chart_reads_its_window_from_an_index(operator, table):
    """The volume chart summed the deposits activated and the invocations paid in its window out of every agreement
    and every invocation (a scan of each, 40-55 ms with 100,000): it reads the window from an index. Planned with
    scans made as dear as PostgreSQL allows, so a plan that still scans the table had no index to read."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    with CaptureQueriesContext(connection) as queries:
        assert operator.get("/admin/dashboard/").status_code == 200
    charted = [query["sql"] for query in queries.captured_queries
               if query["sql"].startswith("SELECT DATE_TRUNC") and f'FROM "{table}"' in query["sql"]]
    assert charted

    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        plans = []
        for sql in charted:
            cursor.execute(f"EXPLAIN {sql}")
            plans.append("\n".join(line for (line,) in cursor.fetchall()))

    assert [plan for plan in plans if f"Seq Scan on {table}" in plan] == []


def test_the_dashboards_counts_by_status_stop_at_the_limit(operator, monkeypatch):
    """Each count by status (agreements, chain transactions, approval requests) was a GROUP BY of every row of its
    table on each view of the dashboard (35-65 ms a table with 100,000 rows): a status is counted up to the limit,
    past it shown as "more than" the limit; a status of fewer rows is counted exactly."""
    monkeypatch.setattr(dashboard, "COUNT_LIMIT", FEW - 1)
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    UsageAgreement.objects.filter(pk=UsageAgreement.objects.order_by("created_at", "id")[0].pk).update(
        status=AgreementStatus.SETTLED)

    with CaptureQueriesContext(connection) as queries:
        page = operator.get("/admin/dashboard/")

    assert page.status_code == 200
    tables = {table["title"]: table for table in page.context["tables"]}
    agreements = tables["Agreements by status"]
    assert dict(agreements["rows"]) == {"active": FEW - 1, "settled": 1}
    assert (agreements["total"], agreements["total_more"]) == (FEW, False)
    approvals = tables["Approval requests by status"]
    assert dict(approvals["rows"]) == {"pending": FEW}  # past the limit: counted up to it and one more
    assert (approvals["total"], approvals["total_more"]) == (FEW - 1, True)
    html = page.content.decode()
    assert f"more than {FEW - 1}" in html
    grouped = [query["sql"] for query in queries.captured_queries if '"status" AS "status", COUNT(' in query["sql"]]
    assert grouped == []


def test_a_deep_page_of_a_big_list_lists_the_rows_of_that_page(operator, monkeypatch):
    monkeypatch.setattr(KeysFirstPaginator, "keys_first_from", 2)
    monkeypatch.setattr(admin.site._registry[UsageAgreement], "list_per_page", 2)
    rows_added(5, owner=get_user_model().objects.create(username="rows-owner"))
    newest_first = list(UsageAgreement.objects.order_by("-created_at", "-id").values_list("pk", flat=True))

    for page in [1, 2, 3]:
        response = operator.get("/admin/agreements/usageagreement/", {"p": page})
        assert response.status_code == 200
        assert [agreement.pk for agreement in response.context["cl"].result_list] == newest_first[
            (page - 1) * 2:page * 2]


def test_a_deep_page_of_a_big_list_reads_the_rows_before_it_from_an_index_alone(operator, monkeypatch):
    """`OFFSET n` read the n agreements before the page whole, from the table (1.1 s for the last page of 100,000):
    their keys are read from the list's index alone. Planned with scans and sorts made as dear as PostgreSQL allows."""
    monkeypatch.setattr(KeysFirstPaginator, "keys_first_from", 2)
    monkeypatch.setattr(admin.site._registry[UsageAgreement], "list_per_page", 2)
    rows_added(5, owner=get_user_model().objects.create(username="rows-owner"))
    with CaptureQueriesContext(connection) as queries:
        assert operator.get("/admin/agreements/usageagreement/", {"p": 3}).status_code == 200
    [page] = [query["sql"] for query in queries.captured_queries if query["sql"].startswith("SELECT") and
              'FROM "agreements_usageagreement"' in query["sql"] and "ORDER BY" in query["sql"]]

    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_sort = off")
        cursor.execute(f"EXPLAIN {page}")
        plan = "\n".join(line for (line,) in cursor.fetchall())

    assert "Index Only Scan using agreement_newest_idx" in plan, (page, plan)


def test_the_agents_search_finds_part_of_a_handle_a_name_an_owners_username_or_email_or_a_whole_wallet(operator):
    owner = get_user_model().objects.create(username="rows-owner", email="ops@rows.example")
    rows_added(FEW, owner=owner)
    agent, other = Agent.objects.order_by("handle")[:2]
    Agent.objects.filter(pk=agent.pk).update(display_name="Zebra Translations")
    everyone = sorted(agent.pk for agent in Agent.objects.all())

    def found(term: str) -> list:
        return sorted(row.pk for row in _found(operator, "/admin/catalog/agent/", term))

    assert found("zebra TRANS") == [agent.pk]
    assert found(other.handle.upper()) == [other.pk]
    assert found("agent-0-") == everyone
    assert found("ROWS-own") == everyone
    assert found("@rows.EXAMPLE") == everyone
    assert found(other.wallet_address) == [other.pk]
    assert found("no-such-agent") == []


def test_the_skills_search_finds_part_of_a_name_or_description_or_a_whole_service_name_or_seller(operator):
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    skill = Skill.objects.select_related("service__seller").order_by("service__created_at", "id").first()
    Skill.objects.filter(pk=skill.pk).update(description="Summarises long documents")
    everyone = sorted(skill.pk for skill in Skill.objects.all())

    def found(term: str) -> list:
        return sorted(row.pk for row in _found(operator, "/admin/catalog/skill/", term))

    assert len(everyone) == FEW
    assert found("RANSLA") == everyone
    assert found("LONG doc") == [skill.pk]
    assert found(f'"{skill.service.name}"') == [skill.pk]
    assert found(skill.service.seller.handle) == sorted(
        row.pk for row in Skill.objects.filter(service__seller=skill.service.seller))
    assert found("Servic") == []  # a service's name whole: not a part of every service's


@pytest.mark.parametrize(("changelist", "table", "term", "indexes"), [
    ("/admin/catalog/agent/", "catalog_agent", "agent-0", ["agent_handle_upper_trgm", "agent_display_name_upper_trgm"]),
    ("/admin/catalog/skill/", "catalog_skill", "ransla", ["skill_name_upper_trgm", "skill_description_upper_trgm"])])
def test_the_agents_and_skills_searches_read_indexes(operator, changelist, table, term, indexes):
    """Django's `icontains` over every search column (through joins to the owners, services and sellers) was planned
    as a read of every agent or skill: each column is asked on its own, through its trigram index. Planned with scans
    of a table or of a whole b-tree made as dear as PostgreSQL allows (a few rows read in the list's order from its
    index are cheaper still)."""
    rows_added(FEW, owner=get_user_model().objects.create(username="rows-owner"))
    with CaptureQueriesContext(connection) as queries:
        assert operator.get(changelist, {"q": term}).status_code == 200
    [searched] = [query["sql"] for query in queries.captured_queries if query["sql"].startswith("SELECT") and
                  f'FROM "{table}"' in query["sql"] and "LIKE" in query["sql"] and "ORDER BY" in query["sql"]]

    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_indexscan = off")
        cursor.execute(f"EXPLAIN {searched}")
        plan = "\n".join(line for (line,) in cursor.fetchall())

    assert [index for index in indexes if f"Bitmap Index Scan on {index}" not in plan] == [], plan
