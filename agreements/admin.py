"""The operators' view of agreements, usage, payments and webhooks.

Agreements, their history, usage events (with their signed receipts), payment authorizations and skill
invocations are records of money: view only (marketplace.admin.MoneyRecordAdmin), as are the sellers' failed
invocations counted against their buyers. They change through
agreements.services / agreements.invocations; the escrow app's admin adds the chain side of an agreement's page.
"""

from django import forms
from django.contrib import admin, messages
from django.db.models import F
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from agreements import selectors, services, webhooks
from agreements.models import (
    AgreementEvent,
    FeeSchedule,
    InvocationSellerFailure,
    PaymentAuthorization,
    SkillInvocation,
    UsageAgreement,
    UsageEvent,
    WebhookDelivery,
    WebhookSubscription,
)
from agreements.serializers import WebhookCreateSerializer

from marketplace import outbound, url_credentials
from marketplace.admin import (
    URLS_ASSUME_HTTPS,
    IndexedSearch,
    known_values_filter,
    supported_tokens,
    LatestRowsInline,
    acknowledgement_page,
    across_pages_refused,
    api_rules_check,
    MoneyRecordAdmin,
    MoneyRecordInline,
    address_column,
    agreement_link,
    amount_column,
    SecretsUnfiltered,
    PrivateContentAdmin,
    content_digest_column,
    may_operate,
    rotation_overlap_column,
    short_hex_html,
    short_id_column,
    short_id_html,
    tx_hash_column,
)
from marketplace.errors import ApplicationError

AGREEMENT_PAGE_DELIVERIES = 20
# What a delivery's event type may be: the types a subscription may name (`WebhookCreateSerializer`).
EVENT_TYPES = WebhookCreateSerializer().fields["event_types"].child.choices
AGREEMENT_PAGE_USAGE_EVENTS = 50


class AgreementEventInline(MoneyRecordInline):
    model = AgreementEvent
    verbose_name = "history entry"
    verbose_name_plural = "history"
    fields = ("created_at", "transition", "actor", "reason")
    readonly_fields = fields
    ordering = ("id",)

    @admin.display(description="transition")
    def transition(self, event) -> str:
        return str(event)

    @admin.display(description="by")
    def actor(self, event) -> str:
        return event.actor


def _request_of(event) -> str | None:
    return f"{event.method} {event.path}".strip() or event.description or None


class UsageEventInline(PrivateContentAdmin, MoneyRecordInline):
    """The latest usage events: each charge with the platform-signed receipt for the cumulative amount. The request
    (the path the buyer called, the seller's description of the charge) is the buyer's: a digest but to staff with
    `view_usage_request`."""

    model = UsageEvent
    verbose_name_plural = f"usage events (latest {AGREEMENT_PAGE_USAGE_EVENTS}; all under Usage events)"
    fields = ("seq", "created_at", "source", "units", "cost_display", "cumulative_display", "request",
              "digest", "receipt")
    readonly_fields = fields
    ordering = ("-seq",)

    cost_display = amount_column("cost", token_attr="agreement.token")
    cumulative_display = amount_column("cumulative")

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("agreement").filter(
            seq__gt=F("agreement__usage_seq") - AGREEMENT_PAGE_USAGE_EVENTS)

    private_fields = ("request",)
    content_permission = "agreements.view_usage_request"
    request_digest = content_digest_column("request", value_of=_request_of)

    @admin.display(description="request")
    def request(self, event) -> str:
        return _request_of(event) or "-"

    @admin.display(description="usage digest")
    def digest(self, event):
        return short_hex_html(event.usage_digest)

    @admin.display(description="receipt (signature)")
    def receipt(self, event):
        return short_hex_html(event.receipt_signature) if event.receipt_signature else "-"


@admin.action(description="Acknowledge selected reverted direct payments (kept, no longer failing reconcile)",
              permissions=["acknowledge"])
def acknowledge_reverted_direct_payment(modeladmin, request, queryset):
    """A page asking why, then services.reverted_payments_acknowledge."""
    reverted = selectors.payments_reverted(of=UsageAgreement).filter(pk__in=queryset.values("pk"))
    return acknowledgement_page(
        modeladmin, request, queryset, what="reverted direct payments", none_left="None of the selected agreements "
        "has a reverted payment not acknowledged yet.",
        acknowledge=lambda selected, **answer: services.reverted_payments_acknowledge(
            payments=selected, **answer),
        findings=reverted,
        columns=["Agreement", "Service", "Amount", "Reverted", "Reason"],
        row=lambda agreement: [str(agreement.pk), f"{agreement.service.name} of {agreement.seller.handle}",
                               agreement.deposit_amount, agreement.payment_reverted_at,
                               agreement.payment_reverted_reason])


@admin.register(UsageAgreement)
class UsageAgreementAdmin(IndexedSearch, PrivateContentAdmin, MoneyRecordAdmin):
    """Status and counters change only through agreements.services (each transition audited). A direct purchase
    whose payment a reorg took after it was counted paid (`payment_reverted_at`) an operator looked into is
    acknowledged (action): it stays here, with who, when and why, and no longer fails `reconcile`. The note is the
    buyer's free text: a digest but to staff with `view_agreement_note`."""

    list_display = ("short_id", "status", "buyer", "seller", "service", "deposit_display", "used_display",
                    "created_at")
    # The columns an index reads in order (IndexedSearch): what an agreement used changes with every call, which an
    # index on it would slow; its parties, service and status sort by joins or by no index.
    sortable_by = ("short_id", "deposit_display", "created_at")
    list_filter = ("status", "settlement_model", known_values_filter("token", supported_tokens),
                   ("payment_reverted_at", admin.EmptyFieldListFilter),
                   ("payment_reversal_acknowledged_at", admin.EmptyFieldListFilter), "created_at")
    actions = [acknowledge_reverted_direct_payment]
    search_fields = ("id", "buyer__handle", "seller__handle", "service__name")
    list_select_related = ("buyer", "seller", "service")
    inlines = [AgreementEventInline, UsageEventInline]
    fieldsets = [
        (None, {"fields": ("id", "status", "status_reason", "status_code", "settlement_model", "buyer", "seller",
                           "service", "note")}),
        ("Money", {"fields": ("deposit_display", "price_display", "quantity_text", "used_display",
                              "reserved_display", "remaining_display", "infra_fee_display", "seller_payout_display",
                              "buyer_refund_display")}),
        ("Chain", {"fields": ("chain_id", "onchain_id", "token_address_display", "buyer_wallet_display",
                              "seller_wallet_display", "fee_recipient_display", "terms_hash_display",
                              "activation_tx_display", "fee_tx_display", "payment_tx_display",
                              "usage_seq", "usage_digest_display")}),
        ("Reverted payment", {"fields": ("payment_reverted_at", "payment_reverted_reason",
                                         "payment_reversal_acknowledged_at", "payment_reversal_acknowledged_by",
                                         "payment_reversal_acknowledgement_reason")}),
        ("Times", {"fields": ("created_at", "proposal_expires_at", "accepted_at", "activated_at",
                              "completion_requested_at", "challenge_window_seconds", "challenge_deadline",
                              "expires_at", "settled_at", "closed_at", "updated_at")}),
        ("Webhook deliveries", {"fields": ("webhook_deliveries",)}),
    ]
    readonly_fields = [name for _title, options in fieldsets for name in options["fields"]]

    private_fields = secret_fields = ("note",)
    content_permission = "agreements.view_agreement_note"

    def has_acknowledge_permission(self, request) -> bool:
        return may_operate(request, UsageAgreement)

    short_id = short_id_column()
    deposit_display = amount_column("deposit_amount", description="deposit (max amount)")
    price_display = amount_column("price_per_unit", description="price per unit")
    used_display = amount_column("used")
    reserved_display = amount_column("reserved")
    infra_fee_display = amount_column("infra_fee", description="platform fee")
    seller_payout_display = amount_column("seller_payout")
    buyer_refund_display = amount_column("buyer_refund")
    token_address_display = address_column("token_address", description="token")
    buyer_wallet_display = address_column("buyer_wallet_address", description="buyer wallet")
    seller_wallet_display = address_column("seller_wallet_address", description="seller wallet")
    fee_recipient_display = address_column("fee_recipient")
    terms_hash_display = tx_hash_column("terms_hash", description="terms hash")  # a hash, not a transaction
    activation_tx_display = tx_hash_column("activation_tx_hash", description="activation transaction")
    fee_tx_display = tx_hash_column("fee_tx_hash", description="fee transaction")
    payment_tx_display = tx_hash_column("payment_tx_hash", description="payment transaction")

    @admin.display(description="remaining")
    def remaining_display(self, agreement):
        return amount_column("remaining")(self, agreement)

    @admin.display(description="quantity")
    def quantity_text(self, agreement) -> str:
        return f"{agreement.quantity} {agreement.unit_name}"

    @admin.display(description="usage digest (head of the chain)")
    def usage_digest_display(self, agreement):
        return short_hex_html(agreement.usage_digest, head=10, tail=6)

    @admin.display(description="on-chain id")
    def onchain_id(self, agreement):
        return short_hex_html(agreement.onchain_id, head=10, tail=6)

    @admin.display(description="latest deliveries")
    def webhook_deliveries(self, agreement):
        deliveries = selectors.webhook_deliveries_of_agreement(agreement_id=agreement.pk,
                                                               limit=AGREEMENT_PAGE_DELIVERIES)
        if not deliveries:
            return "None."
        rows = format_html_join("", '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td>'
                                    '<td>{}</td><td>{}</td></tr>', (
            (reverse("admin:agreements_webhookdelivery_change", args=[d.pk]), d.event_type,
             d.subscription.agent.handle, url_credentials.path_masked(d.subscription.url), d.status, d.attempts,
             d.last_error or d.last_status_code or "") for d in deliveries))
        return format_html('<table class="panel-table" id="agreement-webhook-deliveries"><tr><th>event</th>'
                           '<th>to</th><th>url</th><th>status</th><th>attempts</th><th>last answer</th></tr>{}'
                           '</table>', rows)


@admin.register(UsageEvent)
class UsageEventAdmin(IndexedSearch, PrivateContentAdmin, MoneyRecordAdmin):
    sortable_by = ("short_id",)  # the columns an index reads in order (IndexedSearch)
    list_display = ("short_id", "agreement_short", "seq", "source", "units", "cost_display", "cumulative_display",
                    "signed", "created_at")
    list_filter = ("source", "created_at")
    # Newest first by the key's index: the model's order (by agreement, the agreement's own order, then seq) joined
    # and sorted every event of every agreement for each page.
    ordering = ("-id",)
    search_fields = ("agreement__id", "id")
    list_select_related = ("agreement",)
    fields = readonly_fields = [f.name for f in UsageEvent._meta.fields]
    # The path the buyer called and the seller's description of the charge are the buyer's (UsageEventInline).
    private_fields = secret_fields = ("path", "description")
    content_permission = "agreements.view_usage_request"

    short_id = short_id_column()
    cost_display = amount_column("cost", token_attr="agreement.token")
    cumulative_display = amount_column("cumulative")

    @admin.display(description="agreement", ordering="agreement")
    def agreement_short(self, event):
        return agreement_link(event.agreement_id)

    @admin.display(description="receipt", boolean=True)
    def signed(self, event) -> bool:
        return bool(event.receipt_signature)


class FeeScheduleForm(forms.ModelForm):
    """Each amount within uint256 (the field), and the fee they make with the largest agreement too."""

    def clean(self):
        cleaned = super().clean()
        if not self.errors:
            # The form's fields give Decimals, which round past 28 digits: the amounts as exact ints.
            schedule = FeeSchedule(**{name: int(cleaned[name]) for name in ("percent_bps", "fixed_atomic",
                                                                            "minimum_atomic")})
            problem = services.fee_schedule_problem(schedule)
            if problem:
                raise forms.ValidationError(problem, code="fee_too_large")
        return cleaned


@admin.register(FeeSchedule)
class FeeScheduleAdmin(admin.ModelAdmin):
    """The rates are staff's to change (with `change_feeschedule`); the wallet the fees are paid to is a superuser's:
    staff who may change the rates set it to a wallet of their own, and every fee collected went there."""

    form = FeeScheduleForm
    list_display = ("__str__", "percent_bps", "fixed_display", "minimum_display", "fee_recipient", "updated_at")

    fixed_display = amount_column("fixed_atomic", description="fixed")
    minimum_display = amount_column("minimum_atomic", description="minimum")

    def get_readonly_fields(self, request, obj=None):
        readonly = super().get_readonly_fields(request, obj)
        return readonly if request.user.is_superuser else (*readonly, "fee_recipient")

    def has_add_permission(self, request):
        return not FeeSchedule.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False


class DeliveryInline(LatestRowsInline, MoneyRecordInline):
    model = WebhookDelivery
    verbose_name_plural = f"deliveries (latest {LatestRowsInline.latest_rows}; all under Webhook deliveries)"
    ordering = ("-created_at",)
    fields = ("created_at", "event_type", "status", "attempts", "last_status_code", "last_error", "delivered_at")
    readonly_fields = fields
    show_change_link = True


class WebhookSubscriptionForm(forms.ModelForm):
    """The address and event types, once changed, as the API takes them: a list of known event types (any other value
    failed every agreement event of the agent), an address the SSRF guard allows. Unchanged, they are not checked
    again: a subscription whose name resolves to an internal address since is still deleted by unticking it. No
    change at all by an operator who owns a seller agent to another owner's (`webhooks.subscription_operator_check`)."""

    operator = None  # the staff user saving the form (WebhookSubscriptionAdmin.get_form)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A URL saved with credentials before they were refused is shown, and saved again, as it is called: without.
        if self.instance.pk and url_credentials.has_credentials(self.instance.url):
            self.initial["url"] = url_credentials.without_credentials(self.instance.url)

    def clean(self):
        cleaned = super().clean()
        if self.changed_data:
            try:
                webhooks.subscription_operator_check(subscription=self.instance, operator=self.operator)
            except ApplicationError as refused:
                raise forms.ValidationError(f"{refused.message} ({refused.code})", code=refused.code) from None
        if self.errors or not {"url", "event_types"} & set(self.changed_data):
            return cleaned
        data = {"url": cleaned.get("url", ""), "event_types": cleaned.get("event_types") or []}
        validated = api_rules_check(self, WebhookCreateSerializer, data)
        if validated is None:
            return cleaned
        if "url" in self.changed_data:
            try:
                outbound.url_check(validated["url"])
            except ApplicationError as exc:
                self.add_error("url", f"{exc.message} ({exc.code})")
        cleaned["event_types"] = validated["event_types"]
        return cleaned


@admin.register(WebhookSubscription)
class WebhookSubscriptionAdmin(SecretsUnfiltered, admin.ModelAdmin):
    list_display = ("short_id", "agent", "url_shown", "is_active", "created_at")
    list_filter = ("is_active",)
    # A URL saved with userinfo before it was refused (`marketplace.url_credentials`) is searched by its host,
    # neither filtered on nor sorted by: whether a row was listed, or where, told its userinfo a character at a time.
    search_fields = ("url__host_contains", "agent__handle")
    search_help_text = "An agent's handle, or a host its URL is at."
    readonly_fields = ("secret_hint", "secret_rotation", "paused_reason", "created_at")
    exclude = ("secret", "previous_secret", "previous_secret_expires_at")
    secret_fields = ("secret", "previous_secret", "url")
    formfield_overrides = URLS_ASSUME_HTTPS
    form = WebhookSubscriptionForm
    inlines = [DeliveryInline]

    short_id = short_id_column()
    secret_rotation = rotation_overlap_column("secret")

    @admin.display(description="url")
    def url_shown(self, obj):
        """Its host: the path of a Slack-style webhook is its credential (`url_credentials.path_masked`); staff who
        may change the subscription read the address on its form."""
        return url_credentials.path_masked(obj.url)

    def _url_shown(self, request, obj) -> bool:
        """Whether the whole address is on the page (a Slack-style path is a credential): for staff who may change
        the subscription, the operator who owns a seller agent not among them for another owner's
        (`webhooks.subscription_operator_check`)."""
        if not self.has_change_permission(request, obj):
            return False
        try:
            if obj is not None:
                webhooks.subscription_operator_check(subscription=obj, operator=request.user)
        except ApplicationError:
            return False
        return True

    def get_exclude(self, request, obj=None):
        return (*self.exclude, *(() if self._url_shown(request, obj) else ("url",)))

    def has_add_permission(self, request):
        return False  # An agent subscribes through the API, which shows the new secret once; here it had none.

    @admin.display(description="secret")
    def secret_hint(self, obj):
        # Four characters past the `whsec_` prefix: ten characters showed ten of the sixteen of a secret the agent
        # chose (it has no prefix).
        if not obj.secret:
            return ""
        prefix = "whsec_" if obj.secret.startswith("whsec_") else ""
        return f"{prefix}{obj.secret.removeprefix(prefix)[:4]}…"

    def get_readonly_fields(self, request, obj=None):
        # A subscription stays with its agent: given another, that agent's events went to this one's URL, signed with
        # this one's secret. A deleted subscription's secrets are erased: it could only sign with an empty key, so it
        # stays deleted (its agent subscribes anew).
        deleted = obj is not None and not obj.is_active
        masked = () if self._url_shown(request, obj) else ("url_shown",)
        return (*self.readonly_fields, "agent", *masked, *(("is_active",) if deleted else ()))

    def has_delete_permission(self, request, obj=None):
        return False  # deleted by unticking it, as the API deletes it: its secrets erased, its deliveries' log kept

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        return type(form.__name__, (form,), {"operator": request.user})  # whose change it checks

    def save_model(self, request, obj, form, change):
        # Which columns an operator's save writes is the webhooks service's rule (never the secrets; is_active and
        # paused_at only when changed). The admin adds none (has_add_permission).
        webhooks.subscription_update_by_operator(subscription=obj, changed=form.changed_data)


def _may_redeliver(modeladmin, request) -> bool:
    return may_operate(request, WebhookDelivery)


@admin.action(description="Send selected deliveries again", permissions=["redeliver"])
def redeliver(modeladmin, request, queryset):
    if across_pages_refused(request, "send again"):  # the events the operator sees, not the whole log to everyone
        return
    count = 0
    for delivery in queryset:
        try:
            webhooks.delivery_redeliver(delivery=delivery)
        except ApplicationError as exc:
            messages.warning(request, f"{delivery.pk}: {exc.message}")
            continue
        modeladmin.log_change(request, delivery, "Redelivered")  # who sent it again, in the row's admin history
        count += 1
    messages.success(request, f"Queued {count} delivery(ies).")


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(IndexedSearch, MoneyRecordAdmin):
    """A log of what was sent; sending again is the action, which writes a new attempt."""

    sortable_by = ("short_id", "created_at")  # the columns an index reads in order (IndexedSearch)
    list_display = ("short_id", "event_type", "agreement_short", "subscription_agent", "status", "attempts",
                    "last_status_code", "created_at", "delivered_at")
    list_filter = ("status", known_values_filter("event_type", lambda: EVENT_TYPES, title="event type"))
    # As subscriptions (IndexedSearch): a delivery's id, the handle of the agent it went to, a host its URL is at
    # (the few subscriptions at it looked up first, their deliveries by their key: deliveries grow with every event).
    search_fields = ("id", "subscription__url__host_contains", "subscription__agent__handle")
    list_select_related = ("subscription", "subscription__agent")
    actions = [redeliver]
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]

    short_id = short_id_column()
    has_redeliver_permission = _may_redeliver

    @admin.display(description="agreement")
    def agreement_short(self, delivery):
        return agreement_link((delivery.payload.get("data") or {}).get("agreement_id"))

    @admin.display(description="to", ordering="subscription__agent__handle")
    def subscription_agent(self, delivery) -> str:
        return delivery.subscription.agent.handle


@admin.register(PaymentAuthorization)
class PaymentAuthorizationAdmin(IndexedSearch, MoneyRecordAdmin):
    """Signed x402 payments (EIP-3009) the platform accepted, for direct purchases and skill invocations."""

    sortable_by = ("id",)  # the columns an index reads in order (IndexedSearch)
    list_display = ("id", "payer_display", "pay_to_display", "amount_display", "paid_for", "created_at")
    # What each row paid for (`paid_for_html`) with the row, not four statements more per row.
    list_select_related = ("invocation__skill", "invocation__seller", "agreement__service", "agreement__seller")
    # Not a date hierarchy: it asked for the distinct days of every row on each view of the list.
    list_filter = ("created_at",)
    search_fields = ("id", "invocation__id", "agreement__id")
    fields = ("id", "paid_for", "amount_display", "payer_display", "pay_to_display", "token_address_display",
              "valid_after", "valid_before", "nonce_display", "signature", "created_at")
    readonly_fields = fields

    amount_display = amount_column("amount")
    payer_display = address_column("payer", description="payer")
    pay_to_display = address_column("pay_to", description="pay to")
    token_address_display = address_column("token_address", description="token")

    @admin.display(description="nonce")
    def nonce_display(self, authorization):
        return short_hex_html(authorization.nonce, head=10, tail=6)

    @admin.display(description="paid for")
    def paid_for(self, authorization):
        return paid_for_html(authorization)


def paid_for_html(authorization: PaymentAuthorization):
    """What a payment bought: a skill invocation (skill and seller) or a direct purchase (its agreement)."""
    invocation = getattr(authorization, "invocation", None) if authorization else None
    if invocation is not None:
        return format_html('<a href="{}">skill {} of {}</a>',
                           reverse("admin:agreements_skillinvocation_change", args=[invocation.pk]),
                           invocation.skill.name, invocation.seller.handle)
    agreement = getattr(authorization, "agreement", None) if authorization else None
    if agreement is not None:
        return format_html('<a href="{}">{} ({})</a>',
                           reverse("admin:agreements_usageagreement_change", args=[agreement.pk]),
                           agreement.service.name, agreement.seller.handle)
    return "-"


@admin.action(description="Acknowledge selected reverted payments (kept, no longer failing reconcile)",
              permissions=["acknowledge"])
def acknowledge_reverted_payment(modeladmin, request, queryset):
    """A page asking why, then services.reverted_payments_acknowledge."""
    reverted = selectors.payments_reverted(of=SkillInvocation).filter(pk__in=queryset.values("pk"))
    return acknowledgement_page(
        modeladmin, request, queryset, what="reverted payments", none_left="None of the selected invocations has a "
        "reverted payment not acknowledged yet.",
        acknowledge=lambda selected, **answer: services.reverted_payments_acknowledge(
            payments=selected, **answer),
        findings=reverted,
        columns=["Invocation", "Skill", "Money", "Payment transaction", "Reverted", "Reason"],
        row=lambda invocation: [invocation.public_id, f"{invocation.skill.name} of {invocation.seller.handle}",
                                invocation.money, invocation.payment_tx_hash, invocation.payment_reverted_at,
                                invocation.payment_reverted_reason])


@admin.register(InvocationSellerFailure)
class InvocationSellerFailureAdmin(IndexedSearch, MoneyRecordAdmin):
    """Invocations their seller failed, refunded whole (invocations.invocation_failures_check): search a payer's
    wallet or a seller's handle to see why a buyer party (the agent's owner, the wallet, an anonymous payer's client
    network) is refused that seller's skills, and when that ends. Recorded by agreements.invocations only."""

    sortable_by = ("failed_at",)  # the columns an index reads in order (IndexedSearch)
    list_display = ("invocation_link", "seller", "buyer_owner", "payer_display", "anonymous_client", "failed_at")
    list_filter = (("buyer_owner", admin.EmptyFieldListFilter), ("anonymous_client", admin.EmptyFieldListFilter),
                   "failed_at")
    search_fields = ("payer", "seller__handle", "invocation__id", "buyer_owner__username", "anonymous_client")
    list_select_related = ("invocation", "seller", "buyer_owner")
    ordering = ("-failed_at",)
    fields = ("invocation_link", "seller", "buyer_owner", "payer_display", "anonymous_client", "failed_at")
    readonly_fields = fields

    payer_display = address_column("payer", description="payer")

    @admin.display(description="invocation", ordering="invocation_id")
    def invocation_link(self, failure):
        return short_id_html(failure.invocation.public_id,
                             url=reverse("admin:agreements_skillinvocation_change", args=[failure.invocation_id]))


@admin.register(SkillInvocation)
class SkillInvocationAdmin(IndexedSearch, PrivateContentAdmin, MoneyRecordAdmin):
    """Status and money move through agreements.invocations; a stuck payout or refund is retried from its
    ChainTransaction (escrow admin). A payment a reorg took after the seller was called (`payment_reverted_at`) an
    operator looked into is acknowledged (action): it stays here, with who, when and why, and no longer fails
    `reconcile`."""

    sortable_by = ("short_id", "created_at")  # the columns an index reads in order (IndexedSearch)
    list_display = ("short_id", "skill", "seller", "buyer", "status", "money", "amount_display", "fee_display",
                    "created_at", "completed_at", "payment_reverted_at")
    list_filter = ("status", "money", "is_async", ("payment_reverted_at", admin.EmptyFieldListFilter),
                   ("payment_reversal_acknowledged_at", admin.EmptyFieldListFilter), "created_at")
    search_fields = ("id", "seller__handle", "buyer__handle")
    list_select_related = ("skill", "seller", "buyer")
    fields = ("id", "skill", "seller", "buyer", "status", "money", "amount_display", "fee_display", "payer_display",
              "seller_wallet_display", "payment_tx_display", "settlement_tx_display", "is_async",
              "run_in_background", "timeout_seconds", "input", "result", "error", "created_at", "paid_at",
              "started_at", "deadline_at", "completed_at", "payment_reverted_at", "payment_reverted_reason",
              "payment_reversal_acknowledged_at", "payment_reversal_acknowledged_by",
              "payment_reversal_acknowledgement_reason", "updated_at")
    readonly_fields = fields
    actions = [acknowledge_reverted_payment]
    private_fields = secret_fields = ("input", "result")
    content_permission = "agreements.view_invocation_content"

    def has_acknowledge_permission(self, request) -> bool:
        return may_operate(request, SkillInvocation)

    short_id = short_id_column()
    amount_display = amount_column("amount")
    fee_display = amount_column("fee", description="platform fee")
    seller_wallet_display = address_column("seller_wallet_address", description="seller wallet")
    payment_tx_display = tx_hash_column("payment_tx_hash", description="payment transaction")
    settlement_tx_display = tx_hash_column("settlement_tx_hash", description="payout or refund transaction")

    @admin.display(description="payer")
    def payer_display(self, invocation):
        return address_column("payer")(self, invocation.authorization)
