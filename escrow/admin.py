from django.contrib import admin, messages

from escrow import purchases, relayer
from escrow.models import ChainTransaction, MasumiPurchase, RelayerAccount, TxAttempt, TxStatus


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
    list_display = ("id", "purpose", "status", "agreement", "nonce", "mined_block_number", "failure_reason",
                    "created_at", "updated_at")
    list_filter = ("status", "purpose")
    search_fields = ("id", "agreement__id", "mined_tx_hash", "attempts__tx_hash")
    list_select_related = ("agreement",)
    inlines = [TxAttemptInline]
    actions = [retry_failed]

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in ChainTransaction._meta.fields]

    def has_add_permission(self, request):
        return False


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
