"""What every app's admin shares: read-only money records, and how chain values show. (The site itself, its branding
and its second factor: `marketplace.second_factor.OperatorAdminSite`.)

- Money records (chain transactions and their attempts, usage events and receipts, agreement events, payments)
  are never added, edited or deleted in the admin: `MoneyRecordAdmin` / `MoneyRecordInline` give view permission
  only, so their pages have no Save or Delete button and their lists no "Delete selected". What an operator may
  do to money (retry a failed transaction, resolve a dispute) is an action that calls the owning app's service.
- Amounts show as token units with the symbol beside the exact base units (`marketplace.money`).
- Hashes and addresses are shortened, with the whole value in a tooltip and a link to the chain's explorer when
  the chain has one (`marketplace.explorer`); ids are shortened the same way, so list rows stay one line high.
"""

import hashlib
import json

from axes.admin import AccessAttemptAdmin, AccessFailureLogAdmin, AccessLogAdmin
from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.models import LogEntry
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ORDER_VAR, ChangeList
from django.contrib.postgres.search import SearchQuery
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.core.paginator import Paginator
from django.db import models, transaction
from django.db.models import Count, Q
from django.db.models.constants import LOOKUP_SEP
from django.db.models.expressions import OrderBy
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.crypto import salted_hmac
from django.utils.html import format_html
from django.utils.text import smart_split, unescape_string_literal
from django_otp.admin import user_model_search_fields

from marketplace import account_checks, explorer, money, rotation, text_search
from marketplace.errors import ApplicationError
from marketplace.fields import Bytes32Field
from marketplace.models import AuthenticatorAppDevice, RecoveryCodeDevice, RedeliveredTask


# An address typed without a scheme is read as https (Django 6's default; 5.2 still reads http, and warns).
URLS_ASSUME_HTTPS = {models.URLField: {"assume_scheme": "https"}}


class SecretsUnfiltered:
    """A model admin whose `secret_fields` are filtered on by no change list: Django takes a filter on any of the
    model's own fields from the address (`?proxy_secret__startswith=psk_a`), and whether a row is still listed tells
    the secret the pages never show, a character at a time. Such a filter is refused (400), as Django's user admin
    refuses one on passwords."""

    secret_fields: tuple[str, ...] = ()

    def lookup_allowed(self, lookup, value, request=None):
        if lookup.split(LOOKUP_SEP)[0] in self.secret_fields:
            return False
        return super().lookup_allowed(lookup, value, request)


class PrivateContentAdmin(SecretsUnfiltered):
    """A model admin whose `private_fields` hold what buyers and sellers exchange (a call's input, its result): staff
    with view permission see each one's size and keyed digest (`<field>_digest`: `content_digest_column`'s, unless a
    subclass names its own), which tell
    whether two are the same and whether one is empty or huge; the content takes `content_permission`. No change
    list filters on them (`SecretsUnfiltered`): whether a row was listed told the content a term at a time. Lists the
    fields it shows in `fields` or `fieldsets`."""

    private_fields: tuple[str, ...] = ()
    content_permission = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.private_fields:  # `<field>_digest` of a model field; a subclass names one of its own
            if not hasattr(cls, f"{name}_digest"):
                setattr(cls, f"{name}_digest", content_digest_column(name))

    def _private_masked(self, request, names) -> list[str]:
        if request.user.has_perm(self.content_permission):
            return list(names)
        return [f"{name}_digest" if name in self.private_fields else name for name in names]

    def get_fields(self, request, obj=None):
        return self._private_masked(request, super().get_fields(request, obj))

    def get_readonly_fields(self, request, obj=None):
        return self._private_masked(request, super().get_readonly_fields(request, obj))

    def get_fieldsets(self, request, obj=None):
        return [(title, {**options, "fields": self._private_masked(request, options["fields"])})
                for title, options in super().get_fieldsets(request, obj)]


def content_digest_column(field: str, *, value_of=None):
    """`field` (JSON) as its size and keyed digest, encoded with sorted keys (`PrivateContentAdmin`); `value_of(obj)`
    gives the value where it is not an attribute of that name."""
    @admin.display(description=f"{field.replace('_', ' ')} (size, digest)")
    def column(self, obj) -> str:
        value = value_of(obj) if value_of else getattr(obj, field)
        if value is None:
            return "-"
        encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        return f"{len(encoded)} bytes, hmac-sha256 {content_digest(encoded)}"
    return column


def content_digest(encoded: bytes) -> str:
    """HMAC-SHA256 of private content, under a key derived from SECRET_KEY for this purpose alone: a plain SHA-256
    of short, predictable content (a yes or no, a small number, a known prompt) is found by hashing candidates
    offline. Equal content has an equal digest while SECRET_KEY stays."""
    return salted_hmac("marketplace.admin.content_digest", encoded, algorithm="sha256").hexdigest()


class KeysFirstPaginator(Paginator):
    """A page deep in a list found by its rows' keys first, then those rows read: `OFFSET n` read the n rows before
    the page whole (every column, from the table), 1.1 s for the last page of 100,000 agreements; the keys alone are
    read from the index the list's order is (`-created_at, -id`), not the table. The same rows, in the same order.
    The first pages (and a DISTINCT list, whose keys would carry its order's columns) are read directly."""

    keys_first_from = 1_000  # rows before the page

    def page(self, number):
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        if bottom < self.keys_first_from or self.object_list.query.distinct:
            return super().page(number)
        top = bottom + self.per_page
        if top + self.orphans >= self.count:
            top = self.count
        keys = self.object_list.values("pk")[bottom:top]
        return self._get_page(self.object_list.filter(pk__in=keys), number, self)


class ColumnOrderChangeList(ChangeList):
    """A list sorted by a column's header whose tie-break on the key runs the column's way: Django's ran descending
    whichever way the column ran (`ORDER BY deposit_amount ASC, id DESC`), which no index reads in order (an index
    on (column, id) reads them both ways, forwards or backwards), so the list sorted every row of the table for each
    page. A list in its default order keeps Django's tie-break, which its indexes were made for."""

    def _get_deterministic_ordering(self, ordering):
        ordering = list(ordering)
        settled = super()._get_deterministic_ordering(ordering)
        if self.params.get(ORDER_VAR) and len(settled) > len(ordering) and ordering and _ascending(ordering[0]):
            settled[-1] = "pk"
        return settled


def _ascending(part) -> bool:
    return not part.descending if isinstance(part, OrderBy) else not str(part).startswith("-")


class IndexedSearch:
    """A model admin of a big table whose search reads indexes, not every row (and a page deep in its list, its keys
    first: `KeysFirstPaginator`): Django's search compares each term with
    every `search_fields` column by `icontains` (`UPPER(col) LIKE '%term%'`, over the joins too), which no index
    serves, and took seconds on 100,000 agreements or invocations. Here each term is compared by equality with
    the `search_fields` columns it is a valid value of (a UUID with a UUID column, a number with a number column, an
    address with an address column, a hash in lower case), each the first column of an index
    (tests/marketplace/test_admin_scale.py checks it); a term valid for none of them matches nothing. Whole values
    (an id, a handle, a hash), as an operator copies them from a page's tooltip or a log. A `@<search vector>` entry
    matches the term's words too, as the catalog's search reads them (English, web search syntax: its GIN index). An
    entry ending with a lookup of a small related table (`subscription__url__host_contains`) is asked of that table
    first, with the term as typed, and its rows matched by their key. Its columns sort (`sortable_by`, each admin's)
    by what an index reads in order, the key's tie-break running the column's way (`ColumnOrderChangeList`)."""

    search_help_text = "Whole values only: an id, a handle, a transaction hash (as shown in full in a tooltip)."
    paginator = KeysFirstPaginator

    def get_changelist(self, request, **kwargs):
        return ColumnOrderChangeList

    def get_search_results(self, request, queryset, search_term):
        fields = {path: _field_at(self.model, path) for path in self.get_search_fields(request)
                  if not path.startswith("@")}
        vectors = [path.removeprefix("@") for path in self.get_search_fields(request) if path.startswith("@")]
        if not (fields or vectors) or not search_term:
            return queryset, False
        for term in smart_split(search_term):
            if term.startswith(('"', "'")) and term[0] == term[-1]:
                term = unescape_string_literal(term)
            matches = [_search_match(self.model, path, value) for path, field in fields.items()
                       if (value := _search_value(field, term, lookup=_lookup_at(self.model, path))) is not None]
            if not text_search.negations_nest_too_deep(term):  # which PostgreSQL fails on: a 500
                matches += [Q(**{vector: SearchQuery(term, config="english", search_type="websearch")})
                            for vector in vectors]
            if not matches:
                return queryset.none(), False
            queryset = queryset.filter(Q.create(matches, connector=Q.OR))
        return queryset, False  # no join: each match is on the table's own columns (`_search_match`)


def _search_match(model, path: str, value) -> Q:
    """`path` equal to `value`, as a condition on `model`'s own columns: a related row's column is looked up first
    (its index) and the rows it names are matched by their key. The join Django makes of `buyer__handle` ORed with
    `seller__handle` and `service__name` was planned as a scan of every agreement (an OR over three tables no index
    serves at once); `buyer_id IN (...) OR seller_id IN (...)` reads the key columns' indexes."""
    first, _, rest = path.partition(LOOKUP_SEP)
    field = model._meta.pk if first == "pk" else model._meta.get_field(first)
    if not rest or not field.is_relation:
        return Q(**{path: value})
    related = field.related_model
    if field.concrete:  # a key of this table (`agreement__id`: the key itself, no lookup)
        if rest in ("pk", related._meta.pk.name):
            return Q(**{field.attname: value})
        return Q(**{f"{field.attname}__in": list(related._default_manager.filter(**{rest: value}).values_list(
            field.target_field.attname, flat=True))})
    # A key of the other table naming this one (a transaction's attempts: `attempts__tx_hash`).
    return Q(pk__in=list(related._default_manager.filter(**{rest: value}).values_list(field.field.attname, flat=True)))


def _field_at(model, path: str):
    """The model field at the end of `path` ("agreement__id"), following relations; before its lookup, when it ends
    with one ("subscription__url__host_contains": the subscription's url)."""
    field = None
    for name in path.split(LOOKUP_SEP):
        if field is not None and _lookup_at(model, name):
            break
        field = model._meta.pk if name == "pk" else model._meta.get_field(name)
        model = field.related_model or model
    return field


def _lookup_at(model, path: str) -> str:
    """The lookup `path` ends with ("host_contains" of "subscription__url__host_contains"), "" when it names a field:
    such an entry is matched in the (small) related table first, its rows by their key (`_search_match`)."""
    name = path.split(LOOKUP_SEP)[-1]
    for step in path.split(LOOKUP_SEP)[:-1]:
        field = model._meta.pk if step == "pk" else model._meta.get_field(step)
        model = field.related_model or model
    try:
        model._meta.get_field(name)
    except FieldDoesNotExist:  # a lookup
        return "" if name == "pk" else name
    return ""


def _search_value(field, term: str, *, lookup: str = ""):
    """`term` as a value of `field`, None when it is none (not a UUID, a number out of range, too long); the term
    as typed for a `lookup` (a host a URL is at)."""
    if lookup:
        return term
    try:
        value = field.to_python(term)
        field.run_validators(value)
    except (ValidationError, ValueError, TypeError):
        return None
    return value.lower() if isinstance(field, Bytes32Field) else value


def known_values_filter(field: str, values, *, title: str = ""):
    """A list filter on `field` offering `values()` (the values the code knows: the supported tokens, the event types),
    where Django's filter on a column without choices asked `SELECT DISTINCT field` of the whole table on every view
    of the list (100 ms a page with 100,000 agreements)."""

    class KnownValuesFilter(admin.SimpleListFilter):
        parameter_name = f"{field}__exact"

        def lookups(self, request, model_admin):
            return [(value, value) for value in values()]

        def queryset(self, request, queryset):
            return queryset.filter(**{field: self.value()}) if self.value() is not None else queryset

    KnownValuesFilter.title = title or field.replace("_", " ")
    return KnownValuesFilter


class ViewOnlyAdmin(admin.ModelAdmin):
    """No add, change or delete in the admin: what it shows changes through its app's services. A filtered or
    searched list counts the rows it shows, not every row again for "N total" (a second COUNT(*) over a big table on
    each page view)."""

    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class MoneyRecordAdmin(ViewOnlyAdmin):
    """View only: a record of money changes through its app's services, never by hand."""


class AcknowledgeForm(forms.Form):
    """What an operator's acknowledgement of a failure asks (an unapplied chain event, a reverted payment)."""

    reason = forms.CharField(max_length=500, widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
                             help_text="Why they need no action (kept with your name and the time).")


def acknowledgement_page(modeladmin, request, queryset, *, acknowledge, what: str, columns: list[str], row,
                         none_left: str, findings):
    """An admin action's page asking an operator why the selected failures need no action, then
    `acknowledge(selected, operator=, reason=)` (a service, answering how many of the `selected` rows it
    acknowledged): None once done (back to the list), else the page. `findings`: the failures still to acknowledge
    (a queryset); `row(finding)`: its cells on the page. The answer acknowledges only the failures the page showed,
    as it showed them (the page carries a digest of each row's key and cells): when they changed since (one failed
    meanwhile, or failed again for another reason, or was acknowledged), nothing is done and the page shows them
    again, so no failure is acknowledged unseen or with a reason written for an earlier one. Ticked rows and "select
    all" alike: "select all" posts the list's filter again, not its rows, and the write takes the rows checked, not the
    filter again. The rows checked are locked from the check to the write."""
    select_across = request.POST.get("select_across") == "1"
    form = AcknowledgeForm(request.POST if request.POST.get("confirm") else None)
    if form.is_valid():
        answer = {"operator": request.user, "reason": form.cleaned_data["reason"]}
        try:
            count = _acknowledge_shown(acknowledge, queryset, findings, row, request.POST.get("shown", ""), answer)
        except ApplicationError as exc:
            form.add_error(None, f"{exc.message} ({exc.code})")
        else:
            if count is not None:
                messages.success(request, f"Acknowledged {count} {what}.")
                return None
            form.add_error(None, f"The {what} to acknowledge changed since this page was shown (some failed meanwhile, "
                                 "failed again, or were acknowledged): check them again.")
    shown_rows = _shown_rows(findings, row)
    # "Select all" is posted back as such (with one row, which Django asks for), not as every row's id: past
    # DATA_UPLOAD_MAX_NUMBER_FIELDS ids the operator's answer was refused.
    selected = queryset.values_list("pk", flat=True)
    context = {**modeladmin.admin_site.each_context(request), "opts": modeladmin.model._meta, "form": form,
               "caption": f"{what.capitalize()} to acknowledge: {len(shown_rows)}", "columns": columns,
               "rows": [cells for _key, cells in shown_rows], "none_left": none_left, "action": request.POST["action"],
               "select_across": select_across, "selected": selected[:1] if select_across else selected,
               "shown": _digest(shown_rows), "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
               "title": f"Acknowledge {what}"}
    return TemplateResponse(request, "admin/acknowledge.html", context)


NAMES_SHOWN = 20  # on a confirmation page; "and N more" past them


def action_confirmation(modeladmin, request, queryset, *, keys, title: str, summary: str, names_caption: str,
                        names: list[str], submit: str):
    """Whether the operator confirmed an admin action on the rows named by `keys` (their primary keys): True once
    they did, on the page this answers otherwise (`TemplateResponse`), which says what the action will do (`summary`:
    how many rows) and to whom (`names`: the owners it reaches, every tenant, NAMES_SHOWN of them then how many
    more). The confirmation holds for the rows the page showed (a digest of their keys): when they changed since (a
    row entered the filter of "select all"), the page is shown again, nothing done. "Select all" is posted back as
    such, as `acknowledgement_page` does."""
    shown = _digest([(str(key), []) for key in sorted(str(key) for key in keys)])
    asked = request.POST.get("confirm") == "yes"
    if asked and request.POST.get("shown") == shown:
        return True
    select_across = request.POST.get("select_across") == "1"
    selected = queryset.values_list("pk", flat=True)
    context = {**modeladmin.admin_site.each_context(request), "opts": modeladmin.model._meta, "title": title,
               "summary": summary, "names_caption": names_caption, "names": names[:NAMES_SHOWN],
               "names_more": max(len(names) - NAMES_SHOWN, 0), "submit": submit, "shown": shown,
               "changed": "What you selected changed since the page was shown: check it again." if asked else "",
               "action": request.POST["action"], "select_across": select_across,
               "selected": selected[:1] if select_across else selected,
               "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME}
    return TemplateResponse(request, "admin/confirm_action.html", context)


ACKNOWLEDGED_PER_STATEMENT = 10_000  # rows named in one statement's IN list (SQLite takes 32,766 parameters)


def _acknowledge_shown(acknowledge, queryset, findings, row, shown: str, answer: dict) -> int | None:
    """`acknowledge` of the failures among the selected rows (`queryset`) when they are those the page showed
    (`shown`, their digest), all or none, in batches; None (nothing done) when they changed since."""
    with transaction.atomic():
        keys = sorted(str(pk) for pk in findings.order_by().values_list("pk", flat=True))
        for batch in _batches(keys):  # none of them changes between the check and the write
            list(findings.model.objects.select_for_update().filter(pk__in=batch).order_by("pk")
                 .values_list("pk", flat=True))
        if _digest(_shown_rows(findings, row)) != shown:
            return None
        return sum(acknowledge(queryset.filter(pk__in=batch), **answer) for batch in _batches(keys))


def _batches(keys: list[str]):
    return (keys[start:start + ACKNOWLEDGED_PER_STATEMENT] for start in range(0, len(keys), ACKNOWLEDGED_PER_STATEMENT))


def _shown_rows(findings, row) -> list[tuple[str, list]]:
    """(key, cells) of each failure, in its key's order as text."""
    return sorted(((str(finding.pk), list(row(finding))) for finding in findings), key=lambda shown: shown[0])


def _digest(shown_rows: list[tuple[str, list]]) -> str:
    """What a page showed (each row's key and cells), as one short value it carries (however many rows)."""
    digest = hashlib.sha256()
    for key, cells in shown_rows:
        digest.update("\x1f".join([key, *(str(cell) for cell in cells)]).encode() + b"\n")
    return digest.hexdigest()


class MoneyRecordInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class LatestRowsInline:
    """An inline (mixed into an InlineModelAdmin) showing the first `latest_rows` of its parent's rows in its
    `ordering`, not all: rows an agent makes without bound (its revoked API keys, a subscription's deliveries) made its
    page take seconds and megabytes, and the page's form send more fields than Django takes
    (DATA_UPLOAD_MAX_NUMBER_FIELDS), so an operator's Save (deactivating the agent, deleting the subscription) was
    refused. The rest are on the rows' own list."""

    latest_rows = 50

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        latest_rows = self.latest_rows

        class LatestRows(formset):
            def get_queryset(self):
                # Sliced after the inline formset's filter on the parent (a sliced queryset cannot be filtered).
                if not hasattr(self, "_latest_rows"):
                    self._latest_rows = super().get_queryset()[:latest_rows]
                return self._latest_rows

        return LatestRows


def api_rules_check(form: forms.BaseForm, serializer_class, data: dict, *, field_of=lambda name: name):
    """What an operator typed in `form`, held to the API's rules (`serializer_class`, which reads `data`): the
    validated data, or None with each refusal added to the form's field (`field_of(serializer field)`). A value the
    API refuses with 400 would otherwise be saved here, for the code reading it to fail on."""
    serializer = serializer_class(data=data)
    if serializer.is_valid():
        return serializer.validated_data
    for name, errors in serializer.errors.items():
        field = field_of(name)
        form.add_error(field if field in form.fields else None, "; ".join(_messages(errors)))
    return None


def _messages(errors) -> list[str]:
    """A serializer's errors (nested lists and dicts, by index for a list's items) as flat messages."""
    if isinstance(errors, dict):
        return [f"item {key}: {message}" for key, value in errors.items() for message in _messages(value)]
    if isinstance(errors, list):
        return [message for error in errors for message in _messages(error)]
    return [str(errors)]


def across_pages_refused(request, what: str) -> bool:
    """Whether an action that moves money, decides for an owner or sends agents what they act on (`what`: "approve",
    "reject", "retry", "deregister", "send again") was run on "Select all N" across pages, which it then refuses,
    saying so: that posts the list's filter, not its rows, so a row that entered the filter after the operator looked
    (a new request, a payout failed since), or sat on a page they never opened, was acted on unseen. Such an action is
    run on the rows ticked."""
    if request.POST.get("select_across") != "1":
        return False
    messages.error(request, f"Tick the rows to {what}: \"select all\" across pages would {what} rows you have not "
                            "seen (ones that entered the list since you looked, or on other pages). Nothing was done.")
    return True


def may_operate(request, model) -> bool:
    """Whether the user may run an operator action (a service call) on `model`'s rows: Django's change
    permission for it, which the view-only pages no longer use for editing."""
    opts = model._meta
    return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")


def supported_tokens() -> list[str]:
    return list(settings.SUPPORTED_TOKENS)


# --- how values show -------------------------------------------------------------------------------------------

def amount_html(amount: int | None, token: str = "USDC"):
    """"1.00 USDC  1000000": the token units, and the base units the system keeps, in grey."""
    if amount is None:
        return "-"
    return format_html('<span class="amount">{} <span class="base-units" title="base units">{}</span></span>',
                       money.token_units(amount, token), amount)


def short_hex_html(value: str, *, url: str = "", head: int = 6, tail: int = 4):
    """0x1234…abcd, the whole value in the tooltip; a link when `url` is given."""
    if not value:
        return "-"
    shown = value if len(value) <= head + tail + 1 else f"{value[:head]}…{value[-tail:]}"
    if url:
        return format_html('<a class="mono" href="{}" title="{}" target="_blank" rel="noopener">{}</a>',
                           url, value, shown)
    return format_html('<span class="mono" title="{}">{}</span>', value, shown)


def tx_hash_html(tx_hash: str, chain_id: int | None = None):
    return short_hex_html(tx_hash, url=explorer.transaction_url(tx_hash, chain_id), head=10, tail=6)


def address_html(address: str, chain_id: int | None = None):
    return short_hex_html(address, url=explorer.address_url(address, chain_id), head=8, tail=6)


def short_id_html(value, *, url: str = ""):
    """A UUID or other long id as its first 8 characters (the whole id in the tooltip)."""
    if value is None or value == "":
        return "-"
    text = str(value)
    shown = text if len(text) <= 9 else f"{text[:8]}…"
    if url:
        return format_html('<a class="mono" href="{}" title="{}">{}</a>', url, text, shown)
    return format_html('<span class="mono" title="{}">{}</span>', text, shown)


def agreement_link(agreement_id):
    """An agreement's id, linked to its admin page: the records of every app point at their agreement."""
    if agreement_id is None:
        return "-"
    return short_id_html(agreement_id, url=reverse("admin:agreements_usageagreement_change", args=[agreement_id]))


# --- columns and read-only fields, for list_display and fieldsets ----------------------------------------------

def _chain_id(obj) -> int | None:
    return getattr(obj, "chain_id", None)


def _attr(obj, path: str):
    """`obj.a.b` for "a.b" (None if a step is missing)."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


def amount_column(field: str, *, description: str = "", token_attr: str = "token", token: str = "USDC"):
    """An admin method showing `obj.<field>` as "1.00 USDC 1000000" (the token from `obj.<token_attr>`)."""

    @admin.display(description=description or field.replace("_", " "), ordering=field)
    def column(self, obj):
        return amount_html(getattr(obj, field), _attr(obj, token_attr) or token)

    column.__name__ = f"{field}_display"
    return column


def tx_hash_column(field: str, *, description: str = ""):
    @admin.display(description=description or field.replace("_", " "), ordering=field)
    def column(self, obj):
        return tx_hash_html(getattr(obj, field), _chain_id(obj))

    column.__name__ = f"{field}_display"
    return column


def address_column(field: str, *, description: str = ""):
    @admin.display(description=description or field.replace("_", " "), ordering=field)
    def column(self, obj):
        return address_html(getattr(obj, field), _chain_id(obj))

    column.__name__ = f"{field}_display"
    return column


def short_id_column(field: str = "pk", *, description: str = "id"):
    @admin.display(description=description, ordering=field)
    def column(self, obj):
        return short_id_html(getattr(obj, field))

    column.__name__ = f"short_{field}"
    return column


def rotation_overlap_column(secret_field: str):
    """Whether a rotation's overlap of `secret_field` runs (marketplace.rotation), and till when: never the secrets."""
    @admin.display(description="secret rotation")
    def column(self, obj):
        ends = rotation.overlap_ends_at(obj, secret_field)
        if ends is None:
            return "no overlap running"
        return f"overlap running: the replaced secret signs too until {timezone.localtime(ends):%Y-%m-%d %H:%M:%S %Z}"

    column.__name__ = "secret_rotation"
    return column


# --- poison messages ---------------------------------------------------------------------------------------------

class DeadLetteredFilter(admin.SimpleListFilter):
    title = "dead letter"
    parameter_name = "dead"

    def lookups(self, request, model_admin):
        return [("yes", "Dead letters"), ("no", "Still being retried")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(dead_lettered_at__isnull=self.value() == "no")
        return queryset


@admin.register(RedeliveredTask)
class RedeliveredTaskAdmin(MoneyRecordAdmin):
    """Poison messages (marketplace.dead_letters), view only: a dead letter is re-run by hand once its cause is
    fixed."""

    list_display = ("task_name", "task_id", "redeliveries", "dead_lettered_at", "updated_at")
    list_filter = (DeadLetteredFilter, "task_name")
    search_fields = ("task_id", "task_name")
    readonly_fields = ("task_id", "task_name", "args", "kwargs", "redeliveries", "dead_lettered_at", "created_at",
                       "updated_at")


# --- operators' and owners' accounts ----------------------------------------------------------------------------

# What makes an account an operator's, and which actions it may run.
OPERATOR_POWERS = ("is_staff", "is_superuser", "groups", "user_permissions")


class AccountCheckedForm(forms.ModelForm):
    """A user admin form whose change of an account (its deactivation, its name or e-mail) is refused as
    `account_checks.account_check` says, the account left as it was."""

    operator = None  # the staff user saving the form (AccountAdmin.get_form)

    def clean(self):
        cleaned = super().clean()
        if self.changed_data and self.instance.pk is not None:
            deactivates = "is_active" in self.changed_data and not cleaned.get("is_active", True)
            try:
                account_checks.account_check(account=self.instance, operator=self.operator,
                                             does="deactivates this account" if deactivates else "changes this account")
            except ApplicationError as refused:
                raise ValidationError(f"{refused.message} ({refused.code})", code=refused.code) from None
        return cleaned


class AccountAdmin(UserAdmin):
    """Django's user admin, where staff who may change users (to deactivate an owner) neither give anyone an
    operator's powers (superuser, staff, groups, permissions: themselves first) nor change another operator's account
    (a staff or superuser account: its password or e-mail among them). Only a superuser does. No account is deleted
    here: its admin history would go with it (Django's log entries are deleted with their user), and the policies it
    set and approvals it decided would name no one; an account is deactivated. A change of an account (its
    deactivation, its name) and of its password (set or disabled) are refused as the registered checks say
    (`marketplace.account_checks`: an operator who owns a seller agent changes no other owner's account)."""

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        return type(form.__name__, (AccountCheckedForm, form), {"operator": request.user})

    def get_readonly_fields(self, request, obj=None):
        readonly = super().get_readonly_fields(request, obj)
        return readonly if request.user.is_superuser else (*readonly, *OPERATOR_POWERS)

    def has_change_permission(self, request, obj=None):
        operators_account = obj is not None and (obj.is_superuser or obj.is_staff) and obj.pk != request.user.pk
        if operators_account and not request.user.is_superuser:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return False

    def user_change_password(self, request, id, form_url=""):
        """The password page, opened or posted, refused as the registered checks say: back to the account's page with
        the refusal and its code, the password left as it was."""
        account = self.get_object(request, unquote(id))
        if account is not None and self.has_change_permission(request, account):
            try:
                account_checks.account_check(account=account, operator=request.user, does="sets this account's password")
            except ApplicationError as refused:
                messages.error(request, f"{refused.message} ({refused.code})")
                return HttpResponseRedirect(reverse("admin:auth_user_change", args=[account.pk]))
        return super().user_change_password(request, id, form_url)

    def construct_change_message(self, request, form, formsets, add=False):
        return activity_change_message(super().construct_change_message(request, form, formsets, add), form)


def activity_change_message(message, form):
    """The admin history's message of a change (`message`, Django's) to a row with `is_active` (an owner's account,
    an agent), saying first when it deactivated or reactivated it: Django's "Changed Active." read the same either
    way, so a reactivation (of an agent or owner deactivated for fraud, say) did not stand out in the history."""
    if "is_active" not in form.changed_data:
        return message
    changed = LogEntry(change_message=json.dumps(message)).get_change_message() if message else ""
    return f"{'Reactivated' if form.instance.is_active else 'Deactivated'}. {changed}".strip()


admin.site.unregister(get_user_model())
admin.site.register(get_user_model(), AccountAdmin)


class OperatorGroupAdmin(GroupAdmin):
    """Django's group admin, where only a superuser adds, changes or deletes a group: its permissions are operators'
    powers, and staff who may change groups gave any of them to a group they are in (the user admin keeps them from
    giving anyone powers, themselves first)."""

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser


admin.site.unregister(Group)
admin.site.register(Group, OperatorGroupAdmin)


class LockoutAdmin(AccessAttemptAdmin):
    """axes' list of failed admin logins (the lockouts). Its "Clean up expired attempts" read the time of a login
    attempt off the request, which only a login has: run from the list it was a 500, whatever was ticked. It deletes
    the failures whose lockout has passed (as axes does at the next login), and only for staff who may delete them."""

    actions = ["cleanup_expired_attempts"]

    @admin.action(description="Clean up expired attempts", permissions=["delete"])
    def cleanup_expired_attempts(self, request, queryset):
        request.axes_attempt_time = None  # axes' "no login attempt": the lockout counted back from now
        return super().cleanup_expired_attempts(request, queryset)


if admin.site.is_registered(AccessAttempt):
    admin.site.unregister(AccessAttempt)
    admin.site.register(AccessAttempt, LockoutAdmin)


class LoginRecordAdmin:
    """axes' records of operators' logins (successes, failures): deleted by the daily beat task after
    ADMIN_ACCESS_LOG_KEEP_DAYS, never here, where staff who may delete them (a superuser among them) deleted the record
    of their own login, or of someone's who used their password."""

    def has_delete_permission(self, request, obj=None):
        return False


for _model, _admin in ((AccessLog, AccessLogAdmin), (AccessFailureLog, AccessFailureLogAdmin)):
    if admin.site.is_registered(_model):
        admin.site.unregister(_model)
        admin.site.register(_model, type(_admin.__name__, (LoginRecordAdmin, _admin), {"__doc__": _admin.__doc__}))


# --- the operators' second factors (marketplace.second_factor) ---------------------------------------------------

OPERATOR_SEARCH = user_model_search_fields([get_user_model().USERNAME_FIELD, "email"])  # as django-otp's admins


class SecondFactorAdmin(SecretsUnfiltered, admin.ModelAdmin):
    """Another operator's second factor is a superuser's to delete: staff who may delete devices (for a colleague who
    lost their phone) deleted every superuser's, locking them out until someone with a shell enrolled them again."""

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.user_id != request.user.pk and not request.user.is_superuser:
            return False
        return super().has_delete_permission(request, obj)


@admin.register(AuthenticatorAppDevice)
class OperatorDeviceAdmin(SecondFactorAdmin):
    """Operators' authenticator apps (TOTP devices), listed, and deleted when an operator loses their phone or leaves;
    neither the key nor its sealed form is shown. They are enrolled only by `manage.py admin_totp_enrol`, never here:
    the add form would show the new key, and editing a device would change a credential by hand."""

    list_display = ["user", "name", "created_at", "last_used_at", "confirmed"]
    list_filter = ["created_at", "last_used_at", "confirmed"]
    secret_fields = ("sealed_key",)
    search_fields, search_help_text = OPERATOR_SEARCH
    fields = ["user", "name", "confirmed", "created_at", "last_used_at", "throttling_failure_count"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("user")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(RecoveryCodeDevice)
class OperatorRecoveryCodesAdmin(SecondFactorAdmin):
    """An operator's recovery codes, listed with how many are left and deleted as TOTP devices are; the database keeps
    only the codes' digests, so there is nothing to show, and they are issued only by `manage.py admin_totp_enrol`,
    for the reasons devices are."""

    list_display = ["user", "name", "created_at", "last_used_at", "recovery_codes_left"]
    list_filter = ["created_at", "last_used_at"]
    search_fields, search_help_text = OPERATOR_SEARCH
    fields = ["user", "name", "confirmed", "created_at", "last_used_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("user").annotate(recovery_codes_left=Count("codes"))

    @admin.display(ordering="recovery_codes_left")
    def recovery_codes_left(self, device):
        return device.recovery_codes_left

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
