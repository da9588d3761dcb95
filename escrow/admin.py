"""The operators' view of the chain side: transactions and their attempts, disputes, relayer accounts, Masumi
purchases; and the chain panels of an agreement's page (its transactions, the live on-chain escrow, the dispute).

Every row here records money and is view only (marketplace.admin.MoneyRecordAdmin). The two things an operator
does to money are actions that call escrow's services: retrying a failed transaction (relayer.transaction_retry)
and resolving a dispute (settlement.settlement_resolve); others acknowledge what reconcile reports: chain events the
indexer could not apply (indexer.events_acknowledge) and nonce fills outrun by the old bytes of the transaction they
cancel (services.nonce_fills_acknowledge). All need the model's change permission.
"""

from datetime import UTC, datetime

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from agreements.models import ONCHAIN_STATUSES, AgreementStatus, SettlementModel, UsageAgreement
from escrow import chain, indexer, purchases, relayer, selectors, services, settlement
from escrow.models import (ChainEvent, ChainTransaction, Dispute, EventEffect, IndexerCursor, MasumiPurchase,
                           RelayerAccount, RelayRevert, TxAttempt, TxStatus)
from marketplace import money
from marketplace.admin import (
    known_values_filter,
    IndexedSearch,
    across_pages_refused,
    acknowledgement_page,
    MoneyRecordAdmin,
    MoneyRecordInline,
    PrivateContentAdmin,
    address_column,
    address_html,
    agreement_link,
    amount_column,
    amount_html,
    may_operate,
    short_hex_html,
    short_id_column,
    short_id_html,
    tx_hash_column,
    tx_hash_html,
)
from marketplace.errors import ApplicationError

GWEI = 10**9


def _gwei(wei: int | None) -> str:
    return "-" if wei is None else f"{wei / GWEI:.4f} gwei"


class TxAttemptInline(MoneyRecordInline):
    model = TxAttempt
    verbose_name = "attempt"
    fields = ("tx_hash_display", "nonce", "max_fee", "priority_fee", "created_at", "broadcast_at",
              "broadcast_error")
    readonly_fields = fields

    @admin.display(description="transaction hash")
    def tx_hash_display(self, attempt):
        return tx_hash_html(attempt.tx_hash, attempt.transaction.chain_id)

    @admin.display(description="max fee per gas")
    def max_fee(self, attempt) -> str:
        return _gwei(attempt.max_fee_per_gas)

    @admin.display(description="priority fee")
    def priority_fee(self, attempt) -> str:
        return _gwei(attempt.max_priority_fee_per_gas)


def _may_retry(modeladmin, request) -> bool:
    return may_operate(request, ChainTransaction)


@admin.action(description="Retry selected failed transactions (as new transactions)", permissions=["retry"])
def retry_failed(modeladmin, request, queryset):
    if across_pages_refused(request, "retry"):  # money is sent again for the failures the operator sees
        return
    retried = 0
    for tx in queryset.filter(status=TxStatus.FAILED):
        try:
            relayer.transaction_retry(tx=tx, operator=request.user)
        except ApplicationError as exc:
            messages.warning(request, f"{tx.pk}: {exc.message} ({exc.code})")
            continue
        retried += 1
    messages.success(request, f"Queued {retried} transaction(s) again.")


@admin.action(description="Acknowledge selected nonce fills outrun by the old bytes they cancel (kept, no longer "
                           "failing reconcile)", permissions=["acknowledge"])
def acknowledge_outrun_fills(modeladmin, request, queryset):
    """A page asking why, then services.nonce_fills_acknowledge."""
    outrun = selectors.nonce_fills_outrun().filter(pk__in=queryset.values("pk"))
    return acknowledgement_page(
        modeladmin, request, queryset, what="outrun nonce fills",
        none_left="None of the selected transactions is a nonce fill outrun by the old bytes it cancels and "
                  "unacknowledged.",
        acknowledge=lambda selected, **answer: services.nonce_fills_acknowledge(
            fills=selected, **answer),
        findings=outrun,
        columns=["Fill", "Nonce", "Cancelled transaction", "Mined transaction", "Block"],
        row=lambda fill: [fill.pk, fill.nonce, fill.context.get(relayer.CANCELS), fill.mined_tx_hash,
                          fill.mined_block_number])


def paid_for_html(tx: ChainTransaction):
    """What a transaction moves money for: its agreement, or the skill invocation named in its context."""
    if tx.agreement_id:
        return agreement_link(tx.agreement_id)
    invocation = selectors.invocation_of_transaction(tx=tx)
    if invocation is not None:
        return format_html('<a href="{}" title="invocation {}">skill {} of {}</a>',
                           reverse("admin:agreements_skillinvocation_change", args=[invocation.pk]),
                           invocation.pk, invocation.skill.name, invocation.seller.handle)
    return "-"


@admin.register(ChainTransaction)
class ChainTransactionAdmin(IndexedSearch, MoneyRecordAdmin):
    # What a held payout waits for is on its page and behind the "held until block" filter: one column more made the
    # list scroll sideways on an operator's screen.
    sortable_by = ("short_id",)  # the columns an index reads in order (IndexedSearch)
    list_display = ("short_id", "purpose", "status", "paid_for", "amount", "nonce", "mined_tx_display",
                    "mined_block_number", "failure_short", "updated_at")
    list_filter = ("status", "purpose", ("fee_cap_reached_at", admin.EmptyFieldListFilter),
                   ("held_until_block", admin.EmptyFieldListFilter), ("undecided_since", admin.EmptyFieldListFilter))
    # The mined transaction's hash is one of its attempts' (a unique index).
    search_fields = ("id", "agreement__id", "attempts__tx_hash")
    list_select_related = ("agreement",)
    list_per_page = 50
    inlines = [TxAttemptInline]
    actions = [retry_failed, acknowledge_outrun_fills]
    fields = ("id", "purpose", "status", "paid_for", "amount", "chain_id", "to_display", "relayer", "nonce",
              "gas_limit", "confirmations_required", "mined_tx_display", "mined_block_number", "mined_block_hash",
              "receipt_status", "failure_reason", "waiting_for", "held_until_block", "fee_cap_reached_at",
              "undecided_since", "undecided_reason", "submit_error", "outcome_applied", "context", "data",
              "retry_of", "acknowledged_at", "acknowledged_by", "acknowledgement_reason", "created_at", "updated_at",
              "confirmed_at")
    readonly_fields = fields

    short_id = short_id_column()
    has_retry_permission = has_acknowledge_permission = _may_retry
    mined_tx_display = tx_hash_column("mined_tx_hash", description="mined transaction")
    to_display = address_column("to_address", description="to")

    @admin.display(description="for")
    def paid_for(self, tx):
        return paid_for_html(tx)

    @admin.display(description="amount")
    def amount(self, tx):
        """Transfers from the treasury name their amount in the context; other purposes move what the
        agreement says (see its page)."""
        value = (tx.context or {}).get("amount")
        return amount_html(int(value)) if value is not None else "-"

    @admin.display(description="failure", ordering="failure_reason")
    def failure_short(self, tx) -> str:
        reason = tx.failure_reason
        return reason if len(reason) <= 60 else f"{reason[:57]}…"

    @admin.display(description="operator's retry")
    def retry_of(self, tx):
        context = tx.context or {}
        if relayer.OPERATOR_RETRY_OF not in context:
            return "-"
        failed = context[relayer.OPERATOR_RETRY_OF]
        return format_html("of {}, retried by {}", short_id_html(
            failed, url=reverse("admin:escrow_chaintransaction_change", args=[failed])),
            context.get(relayer.OPERATOR_RETRY_BY) or "an operator not recorded")

    @admin.display(description="waiting", ordering="held_until_block")
    def waiting_for(self, tx) -> str:
        return selectors.finality_wait_of(tx=tx) or "-"


class ChainTransactionInline(MoneyRecordInline):
    """An agreement's chain transactions, on the agreement's page (the id links to the transaction's page)."""

    model = ChainTransaction
    fk_name = "agreement"
    fields = ("short_id", "purpose", "status", "mined_tx_display", "mined_block_number", "failure_reason",
              "created_at", "confirmed_at")
    readonly_fields = fields
    ordering = ("created_at",)

    mined_tx_display = tx_hash_column("mined_tx_hash", description="mined transaction")

    @admin.display(description="id")
    def short_id(self, tx):
        return short_id_html(tx.pk, url=reverse("admin:escrow_chaintransaction_change", args=[tx.pk]))


_ONCHAIN_AMOUNTS = ("depositAmount", "infraFee", "settledAmount", "buyerClaimable", "sellerClaimable")
_ONCHAIN_TIMES = ("expiresAt", "reclaimAfter", "challengeDeadline")
_ONCHAIN_ADDRESSES = ("buyer", "seller", "token", "receiptSigner")


def _onchain_value(name: str, value, chain_id: int):
    if name in _ONCHAIN_AMOUNTS:
        return amount_html(int(value))
    if name in _ONCHAIN_TIMES:
        seconds = int(value)
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if seconds else "-"
    if name in _ONCHAIN_ADDRESSES:
        return address_html(value, chain_id)
    if name == "challengeWindow":
        return f"{int(value)} s"
    if isinstance(value, str) and value.startswith("0x"):
        return short_hex_html(value, head=10, tail=6)
    return value


# The admin agreements registered (its app comes first in INSTALLED_APPS, so its admin module is loaded first).
UsageAgreementAdmin = type(admin.site.get_model_admin(UsageAgreement))


class AgreementWithChainAdmin(UsageAgreementAdmin):
    """The agreement's page with its chain side: the live escrow read from the contract, the dispute and how to
    resolve it, and the chain transactions (agreements knows nothing of the chain, so escrow extends its admin)."""

    inlines = [*UsageAgreementAdmin.inlines, ChainTransactionInline]
    fieldsets = [
        UsageAgreementAdmin.fieldsets[0],
        ("On-chain escrow (read live from the contract)", {"fields": ("onchain_panel",)}),
        ("Dispute", {"fields": ("dispute_panel",)}),
        *UsageAgreementAdmin.fieldsets[1:],
    ]
    readonly_fields = [name for _title, options in fieldsets for name in options["fields"]]

    @admin.display(description="escrow")
    def onchain_panel(self, agreement):
        if agreement.settlement_model != SettlementModel.ESCROW or agreement.status not in ONCHAIN_STATUSES:
            return "No escrow on-chain for this agreement."
        try:
            onchain = selectors.onchain_escrow(agreement=agreement)
            mismatches = selectors.reconciliation_mismatches(agreements=[agreement])
        except (chain.ChainError, ValueError) as exc:
            return format_html('<span class="state-bad">The chain did not answer: {}</span>', exc)
        rows = format_html_join("", '<tr><th scope="row">{}</th><td>{}</td></tr>', (
            (name, _onchain_value(name, value, agreement.chain_id)) for name, value in onchain.items()))
        verdict = (mark_safe('<span class="state-ok">matches our records</span>') if not mismatches else
                   format_html('<span class="state-bad">{}</span>', "; ".join(mismatches)))
        return format_html('<table class="panel-table" id="onchain-panel"><tr><th scope="row">reconciliation</th>'
                           '<td>{}</td></tr>{}</table>', verdict, rows)

    @admin.display(description="dispute")
    def dispute_panel(self, agreement):
        if agreement.status == AgreementStatus.DISPUTED:
            dispute = selectors.disputes().filter(pk=agreement.pk).first()
            if dispute is not None and dispute.resolving:
                return format_html('<span id="dispute-panel" class="state-warn">Disputed: {}. A resolution has '
                                   'been submitted.</span>', agreement.status_reason or "no reason given")
            return format_html('<span id="dispute-panel" class="state-warn">Disputed: {}.</span> {} '
                               '<a class="button" href="{}">Resolve</a>', agreement.status_reason or
                               "no reason given", _times_out(dispute),
                               reverse("admin:escrow_dispute_resolve", args=[agreement.pk]))
        resolution = agreement.events.transitions().filter(from_status=AgreementStatus.DISPUTED).first()
        if resolution is not None:
            return format_html('<span id="dispute-panel">Was disputed; {} by {} at {}: {}</span>',
                               resolution.to_status, resolution.actor,
                               resolution.created_at.strftime("%Y-%m-%d %H:%M:%S %Z"), resolution.reason)
        return mark_safe('<span id="dispute-panel">Not disputed.</span>')


def _times_out(dispute) -> str:
    """An open dispute's timeout, for the agreement's page (the escrow's challengeDeadline above is exact)."""
    if dispute is None or dispute.times_out_at is None:
        return ""
    return (f"Times out about {dispute.times_out_at:%Y-%m-%d %H:%M:%S %Z} "
            f"({selectors.dispute_time_left(dispute, now=timezone.now())}); then the buyer gets the whole deposit.")


admin.site.unregister(UsageAgreement)
admin.site.register(UsageAgreement, AgreementWithChainAdmin)


@admin.action(description="Acknowledge selected failed events (kept, no longer failing reconcile)",
              permissions=["acknowledge"])
def acknowledge_failed(modeladmin, request, queryset):
    """A page asking why, then indexer.events_acknowledge."""
    failed = queryset.filter(effect=EventEffect.FAILED, acknowledged_at=None)
    return acknowledgement_page(
        modeladmin, request, queryset, what="failed events",
        none_left="None of the selected events is failed and unacknowledged.",
        acknowledge=lambda selected, **answer: indexer.events_acknowledge(
            events=selected, **answer), findings=failed,
        columns=["Event", "Block", "Transaction", "Agreement", "Error"],
        row=lambda event: [event.name, event.block_number, event.tx_hash, event.agreement_id or "-", event.error])


@admin.register(ChainEvent)
class ChainEventAdmin(IndexedSearch, MoneyRecordAdmin):
    """What the indexer read. A failed event an operator looked into is acknowledged (action): it stays here, with
    who, when and why, and no longer fails `reconcile`."""

    # The agreement as its linked id (`agreement_link`): its name read its buyer, seller and service, three
    # statements for each row listed.
    sortable_by = ()  # newest first, the order its index reads (IndexedSearch)
    list_display = ("name", "block_number", "log_index", "agreement_short", "effect", "from_status", "to_status",
                    "error", "removed_at", "acknowledged_at", "acknowledged_by")
    # The event names the indexer keeps, not `SELECT DISTINCT name` of every event on each view of the list.
    list_filter = ("effect", known_values_filter("name", indexer.event_names),
                   ("removed_at", admin.EmptyFieldListFilter), ("acknowledged_at", admin.EmptyFieldListFilter))
    search_fields = ("tx_hash", "block_hash", "agreement__id")
    actions = [acknowledge_failed]

    @admin.display(description="agreement", ordering="agreement")
    def agreement_short(self, event):
        return agreement_link(event.agreement_id)

    def has_acknowledge_permission(self, request) -> bool:
        return may_operate(request, ChainEvent)


@admin.register(IndexerCursor)
class IndexerCursorAdmin(MoneyRecordAdmin):
    list_display = ("escrow_address", "chain_id", "start_block", "last_block", "head_block", "head_seen_at",
                    "last_error")


@admin.register(RelayerAccount)
class RelayerAccountAdmin(MoneyRecordAdmin):
    list_display = ("address_display", "chain_id", "next_nonce", "created_at")
    fields = ("address_display", "chain_id", "next_nonce", "created_at")
    readonly_fields = fields

    address_display = address_column("address", description="address")


@admin.register(RelayRevert)
class RelayRevertAdmin(IndexedSearch, MoneyRecordAdmin):
    """Relayed transactions mined reverted by what their party did (relayer.relay_budget_check): search a party
    (agent:<id>, wallet:<address>), the wallet that paid, the owner or an anonymous payer's client address to see
    why its relayed actions are refused, and when that ends."""

    sortable_by = ("reverted_at",)  # the columns an index reads in order (IndexedSearch)
    list_display = ("party", "wallet", "owner", "client", "purpose", "transaction_link", "agreement", "reason",
                    "reverted_at")
    list_filter = ("transaction__purpose",)
    search_fields = ("party", "wallet", "owner__username", "client", "transaction__id", "transaction__agreement__id")
    list_select_related = ("transaction", "owner")
    ordering = ("-reverted_at",)
    fields = ("party", "wallet", "owner", "client", "purpose", "transaction_link", "agreement", "reason",
              "reverted_at")
    readonly_fields = fields

    @admin.display(description="purpose", ordering="transaction__purpose")
    def purpose(self, obj):
        return obj.transaction.purpose

    @admin.display(description="transaction")
    def transaction_link(self, obj):
        return short_id_html(obj.transaction_id,
                             url=reverse("admin:escrow_chaintransaction_change", args=[obj.transaction_id]))

    @admin.display(description="agreement")
    def agreement(self, obj):
        return agreement_link(obj.transaction.agreement_id)


@admin.register(MasumiPurchase)
class MasumiPurchaseAdmin(PrivateContentAdmin, MoneyRecordAdmin):
    """Purchases move through escrow.purchases. A dispute is decided on its agreement (resolve)."""

    list_display = ("short_id", "agreement_short", "agreement_status", "onchain_state", "job_id", "job_status",
                    "job_starts_unanswered", "last_error_code", "submit_result_time", "unlock_time", "created_at")
    list_filter = ("agreement__status",)
    search_fields = ("id", "agreement__id", "job_id", "payment_id", "input_hash", "result_hash")
    list_select_related = ("agreement",)
    fields = readonly_fields = [f.name for f in MasumiPurchase._meta.fields]
    # The metadata is the buyer's free text, as private as its input.
    private_fields = secret_fields = ("input_data", "result", "metadata")
    content_permission = "escrow.view_purchase_content"

    short_id = short_id_column()

    @admin.display(description="agreement", ordering="agreement")
    def agreement_short(self, purchase):
        return agreement_link(purchase.agreement_id)

    @admin.display(description="agreement status", ordering="agreement__status")
    def agreement_status(self, purchase) -> str:
        return purchase.agreement.status

    @admin.display(description="on-chain state (Masumi)")
    def onchain_state(self, purchase) -> str:
        return purchases.purchase_onchain_state(purchase) or "-"


class ResolveForm(forms.Form):
    seller_amount_atomic = forms.IntegerField(
        min_value=0, label="Seller amount (base units)",
        help_text="What the seller is paid out of the deposit; the buyer gets the rest back. 1 USDC = 1000000.")

    def __init__(self, *args, dispute, **kwargs):
        """The most the seller may be awarded, shown as a hint (settlement_resolve decides, from the chain): the
        settlement it proposed and the buyer disputed, not the deposit, which it refuses past that
        (`amount_exceeds_proposal`)."""
        super().__init__(*args, **kwargs)
        field = self.fields["seller_amount_atomic"]
        proposed = dispute.proposed_amount  # as the chain has it: the indexer and the relayer's receipts follow it
        if proposed is None:
            field.widget.attrs["max"] = dispute.deposit_amount
            return
        field.widget.attrs["max"] = proposed
        field.help_text = format_html(
            "What the seller is paid out of the deposit, at most the settlement it proposed and the buyer disputed: "
            "{} ({} base units); the buyer gets the rest back. 1 USDC = 1000000.",
            money.token_units(proposed, dispute.token), proposed)


class DisputeStateFilter(admin.SimpleListFilter):
    """Open disputes unless asked otherwise: those timing out within DISPUTE_TIMEOUT_WARNING_SECONDS, those that
    timed out (settled for the buyer), those the arbiter resolved, or all."""

    title = "dispute"
    parameter_name = "dispute"

    def lookups(self, request, model_admin):
        warning = settings.DISPUTE_TIMEOUT_WARNING.total_seconds() / 86400
        return [("timing_out", f"open, times out within {warning:g} days"),
                ("timed_out", "timed out: settled for the buyer"), ("resolved", "resolved by the arbiter"),
                ("all", "all")]

    def choices(self, changelist):
        yield {"selected": self.value() is None, "display": "open",
               "query_string": changelist.get_query_string(remove=[self.parameter_name])}
        for lookup, title in self.lookup_choices:
            yield {"selected": self.value() == lookup, "display": title,
                   "query_string": changelist.get_query_string({self.parameter_name: lookup})}

    def queryset(self, request, queryset):
        match self.value():
            case None:
                return queryset.filter(status=AgreementStatus.DISPUTED)
            case "timing_out":
                return queryset.filter(status=AgreementStatus.DISPUTED,
                                       times_out_at__lte=timezone.now() + settings.DISPUTE_TIMEOUT_WARNING)
            case "timed_out":
                return queryset.filter(timed_out=True)
            case "resolved":
                return queryset.exclude(status=AgreementStatus.DISPUTED).filter(timed_out=False)
        return queryset


@admin.register(Dispute)
class DisputeAdmin(IndexedSearch, PrivateContentAdmin, MoneyRecordAdmin):
    """Disputes, the open ones by default, soonest timeout first, each with a form that decides it: the same
    resolution as `POST /usage-agreements/{id}/resolve` (on-chain `resolve`, then `finalize`), recorded with the
    operator's name. A dispute nobody resolves by its on-chain timeout (UsageEscrow.DISPUTE_TIMEOUT after the
    challenge) is settled for the buyer, the whole deposit back: each row shows when that is (the books' estimate,
    `selectors.disputes_ever`) and how long is left; a closed one, how it ended."""

    list_display = ("short_id", "buyer", "seller", "service", "deposit_display", "used_display", "status_reason",
                    "disputed_at_display", "times_out_at_display", "time_left", "decision")
    list_filter = (DisputeStateFilter,)
    search_fields = ("id", "buyer__handle", "seller__handle", "service__name")
    list_select_related = ("buyer", "seller", "service")
    readonly_fields = [f.name for f in Dispute._meta.fields]
    private_fields = secret_fields = UsageAgreementAdmin.private_fields  # the agreement's page's
    content_permission = UsageAgreementAdmin.content_permission

    short_id = short_id_column()
    deposit_display = amount_column("deposit_amount", description="deposit")
    used_display = amount_column("used")

    def get_queryset(self, request):
        return selectors.disputes_ever()

    def get_ordering(self, request):
        return ("times_out_at", "pk")  # an annotation: `ordering` may name fields only

    @admin.display(description="disputed at", ordering="disputed_at")
    def disputed_at_display(self, dispute):
        return dispute.disputed_at

    @admin.display(description="times out at (estimate)", ordering="times_out_at")
    def times_out_at_display(self, dispute):
        return dispute.times_out_at

    @admin.display(description="time left")
    def time_left(self, dispute) -> str:
        if dispute.status != AgreementStatus.DISPUTED:
            return "-"
        return selectors.dispute_time_left(dispute, now=timezone.now())

    @admin.display(description="decision / outcome")
    def decision(self, dispute) -> str:
        if dispute.status != AgreementStatus.DISPUTED:
            if dispute.timed_out:
                return format_html('<span class="state-warn">timed out: the whole deposit to the buyer</span> ({})',
                                   dispute.ended_reason)
            return dispute.ended_reason or dispute.status
        if dispute.resolving:
            return "resolution submitted"
        return format_html('<a class="button" href="{}">Resolve</a>',
                           reverse("admin:escrow_dispute_resolve", args=[dispute.pk]))

    def get_urls(self):
        return [path("<uuid:agreement_id>/resolve/", self.admin_site.admin_view(self.resolve_view),
                     name="escrow_dispute_resolve"), *super().get_urls()]

    def resolve_view(self, request, agreement_id):
        if not may_operate(request, Dispute):
            raise PermissionDenied
        dispute = get_object_or_404(selectors.disputes(), pk=agreement_id)
        form = ResolveForm(request.POST or None, dispute=dispute)
        if request.method == "POST" and form.is_valid():
            amount = form.cleaned_data["seller_amount_atomic"]
            try:
                settlement.settlement_resolve(agreement=dispute, seller_amount=amount, operator=request.user)
            except ApplicationError as exc:
                form.add_error(None, f"{exc.message} ({exc.code})")
            else:
                messages.success(request, format_html(
                    "Resolution submitted: {} to the seller, {} back to the buyer.", amount_html(amount, dispute.token),
                    amount_html(dispute.deposit_amount - amount, dispute.token)))
                return redirect("admin:escrow_dispute_changelist")
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "dispute": dispute,
                   "form": form, "title": f"Resolve dispute {str(dispute.pk)[:8]}",
                   "deposit": amount_html(dispute.deposit_amount, dispute.token),
                   "used": amount_html(dispute.used, dispute.token),
                   "evidence": selectors.dispute_evidence(dispute),
                   "events": dispute.events.order_by("id")}
        return TemplateResponse(request, "admin/escrow/dispute/resolve.html", context)
