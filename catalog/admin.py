"""The operators' view of the catalog: agents, credentials, services, skills, tags.

Writes with rules behind them go through catalog.services (revoking, deregistering); the admin only picks rows.
Credentials are view only, revoked by the action: never edited (scope, expiry) nor deleted.
Secrets are never shown: a credential's digest stays out of the pages, its prefix identifies it.
"""

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Count, F, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from catalog import services
from catalog.models import Agent, ApiKey, OwnerToken, Service, ServiceState, Skill, Tag
from marketplace import shown_text, url_credentials
from marketplace.admin import (IndexedSearch, LatestRowsInline, SecretsUnfiltered, ViewOnlyAdmin, across_pages_refused,
                               action_confirmation, activity_change_message, known_values_filter, may_operate, rotation_overlap_column,
                               supported_tokens)
from marketplace.errors import ApplicationError

CREDENTIAL_FIELDS = ("name", "prefix", "created_at", "expires_at", "revoked_at", "last_used_at")


class CredentialStatusFilter(admin.SimpleListFilter):
    """Live, revoked or expired (an expired credential may not have been swept into `revoked_at` yet)."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("live", "Live"), ("revoked", "Revoked"), ("expired", "Expired")]

    def queryset(self, request, queryset):
        now = timezone.now()
        not_expired = Q(expires_at=None) | Q(expires_at__gt=now)
        if self.value() == "live":
            return queryset.filter(not_expired, revoked_at=None)
        if self.value() == "revoked":
            return queryset.exclude(revoked_at=None)
        if self.value() == "expired":
            return queryset.filter(revoked_at=None, expires_at__lte=now)
        return queryset


def _revoke(modeladmin, request, credentials) -> None:
    count = 0
    for credential in credentials:
        try:
            services.operator_owns_a_seller_check(owner_id=_holder(credential).pk, operator=request.user,
                                                  does="revokes this")
        except ApplicationError as refused:
            messages.error(request, f"{credential.prefix}: {refused.message} ({refused.code})")
            continue
        services.credential_revoke(credential=credential)
        modeladmin.log_change(request, credential, "Revoked")  # who shut it out, in the row's admin history
        count += 1
    # An owner token's revocation is also that of the tokens and agent keys issued with it (credential_revoke):
    # whoever revokes a leaked token revokes what was minted with it, whatever else they may change.
    messages.success(request, f"Revoked {count} credential(s), and any an owner token among them issued; they stop "
                             f"working within {settings.CREDENTIAL_CACHE_SECONDS} s (CREDENTIAL_CACHE_SECONDS).")


def _holder(credential):
    """The owner a credential shuts out when revoked: an API key's agent's, or the owner token's."""
    return credential.agent.owner if isinstance(credential, ApiKey) else credential.owner


def _revocation_confirmed(modeladmin, request, queryset, credentials):
    """`credentials` (live, with their holders) revoked once the operator confirmed, on a page saying how many and
    whose: a revocation shuts each owner out for good, and "select all" of a list (by design: an incident's) reached
    every owner its filter did, from one click. Those the page showed are revoked, not one issued since."""
    credentials = list(credentials)
    if not credentials:
        messages.info(request, "None of the selected credentials is live: nothing to revoke.")
        return None
    owners = sorted({_holder(credential).get_username() for credential in credentials})
    tokens = sum(isinstance(credential, OwnerToken) for credential in credentials)
    confirmation = action_confirmation(
        modeladmin, request, queryset, keys=[credential.pk for credential in credentials],
        title="Revoke credentials", submit="Yes, revoke them", names=owners,
        names_caption="Owners shut out (every agent key or owner token of theirs selected stops working)",
        summary=f"Revoke {len(credentials)} credentials of {len(owners)} owners"
                + (f", and what the {tokens} owner tokens among them issued" if tokens else "")
                + ". A revoked credential is never live again: its holder is issued a new one.")
    if confirmation is not True:
        return confirmation
    _revoke(modeladmin, request, credentials)
    return None


@admin.action(description="Revoke selected credentials", permissions=["revoke"])
def revoke_credentials(modeladmin, request, queryset):
    return _revocation_confirmed(modeladmin, request, queryset, queryset.filter(revoked_at=None).select_related(
        "agent__owner" if modeladmin.model is ApiKey else "owner"))


@admin.action(description="Revoke every API key of the selected agents", permissions=["revoke"])
def revoke_agent_keys(modeladmin, request, queryset):
    return _revocation_confirmed(modeladmin, request, queryset, ApiKey.objects.filter(
        agent__in=queryset, revoked_at=None).select_related("agent__owner"))


class ApiKeyInline(LatestRowsInline, admin.TabularInline):
    """Its live keys (API_KEYS_PER_AGENT at most) first, then the latest revoked ones (kept for ever)."""

    model = ApiKey
    verbose_name_plural = f"API keys (live ones, then the latest revoked: {LatestRowsInline.latest_rows} at most; " \
                          "all under API keys)"
    ordering = (F("revoked_at").desc(nulls_first=True), "-created_at")
    extra = 0
    can_delete = False
    fields = ("name", "prefix", "scope", "created_at", "expires_at", "revoked_at", "last_used_at")
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False  # Keys are issued through the API or `manage.py issue_api_key`, which show the secret once.


class AgentForm(forms.ModelForm):
    operator = None  # the staff user saving the form (AgentAdmin.get_form)

    def clean_is_active(self) -> bool:
        """Reactivating an agent is refused to its owner (`services.agent_reactivation_check`); deactivating another
        owner's, to an operator who owns a seller (`services.operator_owns_a_seller_check`: a competitor shut out)."""
        is_active = self.cleaned_data["is_active"]
        if "is_active" in self.changed_data:
            try:
                if is_active:
                    services.agent_reactivation_check(agent=self.instance, operator=self.operator)
                else:
                    services.operator_owns_a_seller_check(owner_id=self.instance.owner_id, operator=self.operator,
                                                          does="deactivates this agent")
            except ApplicationError as refused:
                raise forms.ValidationError(f"{refused.message} ({refused.code})", code=refused.code) from None
        return is_active

    def clean_display_name(self) -> str:
        """A display name staff change is held to the API's rule (`marketplace.shown_text`); one left as it was is
        not, so an agent whose name came before the rule can still be deactivated (its name corrected later). What
        buyers read beside a seller's services is not another owner's to change for an operator who owns a seller
        (`services.operator_owns_a_seller_check`: a competitor renamed)."""
        name = self.cleaned_data["display_name"]
        if "display_name" not in self.changed_data:
            return name
        if characters := shown_text.unsafe_characters(name):
            raise forms.ValidationError(shown_text.message(characters), code=shown_text.CODE)
        try:
            services.operator_owns_a_seller_check(owner_id=self.instance.owner_id, operator=self.operator,
                                                  does="renames this agent")
        except ApplicationError as refused:
            raise forms.ValidationError(f"{refused.message} ({refused.code})", code=refused.code) from None
        return name


@admin.register(Agent)
class AgentAdmin(IndexedSearch, admin.ModelAdmin):
    form = AgentForm
    list_display = ("handle", "display_name", "owner", "wallet_address", "is_buyer", "is_seller", "is_active",
                    "owner_is_active", "service_count", "created_at")
    list_filter = ("is_active", "owner_is_active", "is_buyer", "is_seller")
    # Part of a handle, a name, an owner's username or email (their trigram indexes on PostgreSQL: migration 0022),
    # the owners looked up first; a wallet whole.
    search_fields = ("handle__icontains", "display_name__icontains", "wallet_address", "owner__username__icontains",
                     "owner__email__icontains")
    search_help_text = "Part of a handle, a display name, an owner's username or email; or a whole wallet address."
    # What the API fixes at an agent's creation stays as it was: its wallet (a seller's next sales are paid to it),
    # its handle (owners' policies allow and block sellers by it), its owner (who holds its keys and policy), its
    # roles. Staff deactivate an agent or correct its display name; agents are created through the API (the owner's
    # limit, reserved handles) and deactivated, never deleted (their keys, policy and approvals are their record).
    fields = ("id", "handle", "display_name", "owner", "wallet_address", "wallet_proven_at", "is_buyer", "is_seller",
              "is_active", "owner_is_active", "created_at")
    readonly_fields = ("id", "handle", "owner", "wallet_address", "wallet_proven_at", "is_buyer", "is_seller",
                       "owner_is_active", "created_at")
    list_select_related = ("owner",)
    inlines = [ApiKeyInline]
    actions = [revoke_agent_keys]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_revoke_permission(self, request) -> bool:
        return may_operate(request, ApiKey)

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        form.operator = request.user  # whose change the form checks (agent_reactivation_check)
        return form

    def construct_change_message(self, request, form, formsets, add=False):
        return activity_change_message(super().construct_change_message(request, form, formsets, add), form)

    def get_queryset(self, request) -> QuerySet[Agent]:
        # Counted per listed agent (a subquery, on the services' seller index), not by grouping every service of
        # every agent before the page is cut (1 s with 100,000 services).
        services = Service.objects.filter(seller=OuterRef("pk")).order_by().values("seller").annotate(
            count=Count("pk")).values("count")
        return super().get_queryset(request).annotate(_service_count=Coalesce(Subquery(services), 0))

    @admin.display(description="services", ordering="_service_count")
    def service_count(self, agent) -> int:
        return agent._service_count


class CredentialAdmin(SecretsUnfiltered, admin.ModelAdmin):
    list_filter = (CredentialStatusFilter,)
    secret_fields = ("secret_digest",)
    actions = [revoke_credentials]
    date_hierarchy = "created_at"

    def has_revoke_permission(self, request) -> bool:
        return may_operate(request, self.model)

    def has_add_permission(self, request):
        return False  # The secret must be shown once at creation, which the API and commands do.

    # A credential's powers (an API key's scope, an expiry) changed on its page changed silently what its holder may
    # do, and a deleted one left no record of who had it: here one is only revoked (the action, which records who),
    # and a new one is issued through the API.
    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ApiKey)
class ApiKeyAdmin(CredentialAdmin):
    list_display = ("prefix", "agent", "name", "scope", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = (CredentialStatusFilter, "scope")
    search_fields = ("prefix", "name", "agent__handle")
    list_select_related = ("agent",)
    fields = ("agent", "scope", *CREDENTIAL_FIELDS, "issued_with")  # the owner token whose revocation revokes it
    readonly_fields = fields


@admin.register(OwnerToken)
class OwnerTokenAdmin(CredentialAdmin):
    list_display = ("prefix", "owner", "name", "scope", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = (CredentialStatusFilter, "scope")
    search_fields = ("prefix", "name", "owner__username", "owner__email")
    list_select_related = ("owner",)
    fields = ("owner", "scope", *CREDENTIAL_FIELDS, "issued_with")  # the token whose revocation revokes it
    readonly_fields = fields


class SkillInline(admin.TabularInline):
    model = Skill
    extra = 0
    can_delete = False
    readonly_fields = ("name", "description", "price", "path", "is_async", "timeout_seconds")

    def has_add_permission(self, request, obj=None):
        return False


@admin.action(description="Deregister selected services (hidden from search, kept for history)",
              permissions=["deregister"])
def deregister_services(modeladmin, request, queryset):
    # For good (a deregistered service is not changed or listed again; its pending purchases and skill calls are
    # refused): of the services the operator sees.
    if across_pages_refused(request, "deregister"):
        return
    count = 0
    for service in queryset.filter(state=ServiceState.REGISTERED).select_related("seller"):
        try:
            services.service_deregister(service=service, actor=None, operator=request.user)
        except ApplicationError as refused:
            messages.error(request, f"{service.name}: {refused.message} ({refused.code})")
            continue
        modeladmin.log_change(request, service, "Deregistered")
        count += 1
    messages.success(request, f"Deregistered {count} service(s).")


@admin.register(Service)
class ServiceAdmin(IndexedSearch, SecretsUnfiltered, admin.ModelAdmin):
    sortable_by = ()  # no column an index reads in order (IndexedSearch): filter, or search
    list_display = ("name", "seller", "state", "pricing_type", "unit_price", "token", "upstream_protocol",
                    "availability", "created_at")
    list_filter = ("state", "pricing_type", "upstream_protocol", "availability",
                   known_values_filter("token", supported_tokens), "seller__is_active", "created_at")
    search_fields = ("id", "name", "seller__handle", "@search_vector")  # IndexedSearch: the catalog search's words too
    search_help_text = "A service's id or name, its seller's handle, or words of its listing."
    # The HMAC keys sellers verify proxied calls with stay secret; `secret_rotation` tells whether two sign.
    _hidden = ("search_vector", "proxy_secret", "previous_proxy_secret", "previous_proxy_secret_expires_at",
               "upstream_base_url")  # shown as `upstream`, credentials saved in it masked
    exclude = _hidden
    # and the upstream, which may hold credentials saved before they were refused (`marketplace.url_credentials`)
    secret_fields = ("proxy_secret", "previous_proxy_secret", "upstream_base_url")
    list_select_related = ("seller",)
    inlines = [SkillInline]
    actions = [deregister_services]
    # The change list of 100,000 services must not count them all on every page view.
    show_full_result_count = False

    # Services change through the API (catalog.services keeps search data in step); operators read and deregister.
    def get_readonly_fields(self, request, obj=None):
        # The path and query of a seller's upstream may carry a token, as a webhook's may: staff who may not change
        # services see its host (`url_credentials.path_masked`).
        upstream = "upstream" if may_operate(request, Service) else "upstream_host"
        return [f.name for f in Service._meta.fields if f.name not in self._hidden] + [upstream, "tags",
                                                                                      "secret_rotation"]

    secret_rotation = rotation_overlap_column("proxy_secret")

    @admin.display(description="upstream base url")
    def upstream(self, obj):
        return url_credentials.credentials_masked(obj.upstream_base_url)

    @admin.display(description="upstream base url")
    def upstream_host(self, obj):
        return url_credentials.path_masked(obj.upstream_base_url)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False  # every field is read-only: a view page, without a Save button

    def has_delete_permission(self, request, obj=None):
        return False  # deregistered (the action), kept for history, as the API withdraws a listing

    def has_deregister_permission(self, request) -> bool:
        return may_operate(request, Service)


@admin.register(Skill)
class SkillAdmin(IndexedSearch, ViewOnlyAdmin):
    sortable_by = ()  # by name, the order its index reads (IndexedSearch)
    list_display = ("name", "service", "seller", "price", "is_async", "timeout_seconds")
    list_filter = ("is_async", "service__state")
    # Part of a skill's name or description (trigram indexes on PostgreSQL: migration 0022); its service's name or
    # seller's handle whole (their b-tree indexes), not part of them in every one of 100,000 services.
    search_fields = ("name__icontains", "description__icontains", "service__name", "service__seller__handle")
    search_help_text = "Part of a skill's name or description; or its service's whole name or its seller's handle."
    list_select_related = ("service", "service__seller")

    @admin.display(description="seller", ordering="service__seller__handle")
    def seller(self, skill) -> Agent:
        return skill.service.seller

    # Skills are part of their service's listing and change with it, through the API.
    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Skill._meta.fields]


@admin.register(Tag)
class TagAdmin(ViewOnlyAdmin):
    """View only: tags come with sellers' listings through the API. Renamed or deleted here, every listing bearing
    one changed with its search data left as it was, and owners' policies blocking it (`blocked_tags`) no longer
    matched."""

    list_display = ("name", "service_count")
    search_fields = ("name",)

    def get_queryset(self, request) -> QuerySet[Tag]:
        return super().get_queryset(request).annotate(
            _service_count=Count("services", filter=Q(services__state=ServiceState.REGISTERED)))

    @admin.display(description="registered services", ordering="_service_count")
    def service_count(self, tag) -> int:
        return tag._service_count
