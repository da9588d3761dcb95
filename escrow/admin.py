from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from escrow import purchases, relayer, selectors, settlement
from escrow.models import (ChainEvent, ChainTransaction, Dispute, IndexerCursor, MasumiPurchase, RelayerAccount,
                           TxAttempt, TxStatus)
from marketplace.errors import ApplicationError


class TxAttemptInline(admin.TabularInline):
    model = TxAttempt
    extra = 0
    can_delete = False
    fields = ("tx_hash", "nonce", "max_fee_per_gas", "max_priority_fee_per_gas", "created_at", "broadcast_at",
              "broadcast_error")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


@admin.action(description="Retry selected failed transactions (as new transactions)")
def retry_failed(modeladmin, request, queryset):
    retried = 0
    for tx in queryset.filter(status=TxStatus.FAILED):
        relayer.transaction_retry(tx=tx)
        retried += 1
    messages.success(request, f"Queued {retried} transaction(s) again.")


@admin.register(ChainTransaction)
class ChainTransactionAdmin(admin.ModelAdmin):
    list_display = ("id", "purpose", "status", "stuck_at_fee_cap", "agreement", "nonce", "mined_block_number",
                    "failure_reason", "created_at", "updated_at")
    list_filter = ("status", "purpose", ("fee_cap_reached_at", admin.EmptyFieldListFilter))
    search_fields = ("id", "agreement__id", "mined_tx_hash", "attempts__tx_hash")
    list_select_related = ("agreement",)
    inlines = [TxAttemptInline]
    actions = [retry_failed]

    @admin.display(boolean=True, description="stuck at fee cap")
    def stuck_at_fee_cap(self, tx) -> bool:
        return tx.stuck_at_fee_cap

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in ChainTransaction._meta.fields]

    def has_add_permission(self, request):
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """What the chain says is not edited by hand."""

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ChainEvent)
class ChainEventAdmin(ReadOnlyAdmin):
    list_display = ("name", "block_number", "log_index", "agreement", "effect", "from_status", "to_status", "error",
                    "removed_at")
    list_filter = ("effect", "name", ("removed_at", admin.EmptyFieldListFilter))
    search_fields = ("tx_hash", "block_hash", "agreement__id")
    list_select_related = ("agreement",)


@admin.register(IndexerCursor)
class IndexerCursorAdmin(ReadOnlyAdmin):
    list_display = ("escrow_address", "chain_id", "start_block", "last_block", "head_block", "head_seen_at",
                    "last_error")


@admin.register(RelayerAccount)
class RelayerAccountAdmin(admin.ModelAdmin):
    list_display = ("address", "chain_id", "next_nonce", "created_at")
    readonly_fields = ("address", "chain_id", "next_nonce", "created_at")

    def has_add_permission(self, request):
        return False


@admin.register(MasumiPurchase)
class MasumiPurchaseAdmin(admin.ModelAdmin):
    """Read-only: purchases move through escrow.purchases. A dispute is decided on its agreement (resolve)."""

    list_display = ("id", "agreement", "agreement_status", "onchain_state", "job_id", "job_status",
                    "submit_result_time", "unlock_time", "refund_requested_at", "created_at")
    list_filter = ("agreement__status",)
    search_fields = ("id", "agreement__id", "job_id", "payment_id", "input_hash", "result_hash")
    list_select_related = ("agreement",)

    @admin.display(description="agreement status", ordering="agreement__status")
    def agreement_status(self, purchase) -> str:
        return purchase.agreement.status

    @admin.display(description="on-chain state (Masumi)")
    def onchain_state(self, purchase) -> str:
        return purchases.purchase_onchain_state(purchase) or "-"

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in MasumiPurchase._meta.fields]

    def has_add_permission(self, request):
        return False


class ResolveForm(forms.Form):
    seller_amount_atomic = forms.IntegerField(
        min_value=0, label="Seller amount (base units)",
        help_text="What the seller is paid out of the deposit; the buyer gets the rest back. 1 USDC = 1000000.")

    def __init__(self, *args, deposit: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["seller_amount_atomic"].widget.attrs["max"] = deposit  # a hint; settlement_resolve decides


@admin.register(Dispute)
class DisputeAdmin(admin.ModelAdmin):
    """Disputed agreements, oldest first, each with a form that decides it: the same resolution as
    `POST /usage-agreements/{id}/resolve` (on-chain `resolve`, then `finalize`), recorded with the operator's name."""

    list_display = ("id", "buyer", "seller", "service", "deposit_amount", "used", "status_reason", "updated_at",
                    "decision")
    search_fields = ("id", "buyer__handle", "seller__handle", "service__name")
    list_select_related = ("buyer", "seller", "service")
    ordering = ("updated_at",)

    def get_queryset(self, request):
        return selectors.disputes()

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Dispute._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="decision")
    def decision(self, dispute) -> str:
        if dispute.resolving:
            return "resolution submitted"
        return format_html('<a class="button" href="{}">Resolve</a>',
                           reverse("admin:escrow_dispute_resolve", args=[dispute.pk]))

    def get_urls(self):
        return [path("<uuid:agreement_id>/resolve/", self.admin_site.admin_view(self.resolve_view),
                     name="escrow_dispute_resolve"), *super().get_urls()]

    def resolve_view(self, request, agreement_id):
        if not self.has_change_permission(request):
            raise PermissionDenied
        dispute = get_object_or_404(self.get_queryset(request), pk=agreement_id)
        form = ResolveForm(request.POST or None, deposit=dispute.deposit_amount)
        if request.method == "POST" and form.is_valid():
            amount = form.cleaned_data["seller_amount_atomic"]
            try:
                settlement.settlement_resolve(agreement=dispute, seller_amount=amount, operator=request.user)
            except ApplicationError as exc:
                form.add_error(None, f"{exc.message} ({exc.code})")
            else:
                messages.success(request, f"Resolution submitted: {amount} to the seller, "
                                          f"{dispute.deposit_amount - amount} back to the buyer.")
                return redirect("admin:escrow_dispute_changelist")
        context = {**self.admin_site.each_context(request), "opts": self.model._meta, "dispute": dispute,
                   "form": form, "title": f"Resolve dispute {dispute.pk}",
                   "events": dispute.events.order_by("id")}
        return TemplateResponse(request, "admin/escrow/dispute/resolve.html", context)
