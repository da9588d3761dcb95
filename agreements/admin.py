from django.contrib import admin, messages

from agreements import webhooks
from agreements.models import (
    AgreementEvent,
    FeeSchedule,
    SkillInvocation,
    UsageAgreement,
    WebhookDelivery,
    WebhookSubscription,
)


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class AgreementEventInline(ReadOnlyInline):
    model = AgreementEvent
    fields = ("created_at", "from_status", "to_status", "actor_kind", "actor_label", "reason")
    readonly_fields = fields
    ordering = ("id",)


@admin.register(UsageAgreement)
class UsageAgreementAdmin(admin.ModelAdmin):
    list_display = ("id", "buyer", "seller", "service", "settlement_model", "status", "deposit_amount", "used",
                    "reserved", "created_at")
    list_filter = ("status", "settlement_model", "token")
    search_fields = ("id", "buyer__handle", "seller__handle", "service__name", "terms_hash")
    list_select_related = ("buyer", "seller", "service")
    date_hierarchy = "created_at"
    inlines = [AgreementEventInline]

    # Status and counters change only through agreements.services (each transition audited).
    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in UsageAgreement._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(FeeSchedule)
class FeeScheduleAdmin(admin.ModelAdmin):
    list_display = ("__str__", "percent_bps", "fixed_atomic", "minimum_atomic", "fee_recipient", "updated_at")

    def has_add_permission(self, request):
        return not FeeSchedule.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False


class DeliveryInline(ReadOnlyInline):
    model = WebhookDelivery
    fields = ("created_at", "event_type", "status", "attempts", "last_status_code", "last_error", "delivered_at")
    readonly_fields = fields


@admin.register(WebhookSubscription)
class WebhookSubscriptionAdmin(admin.ModelAdmin):
    list_display = ("id", "agent", "url", "is_active", "created_at")
    list_filter = ("is_active",)
    search_fields = ("url", "agent__handle")
    readonly_fields = ("secret_hint", "created_at")
    exclude = ("secret",)
    inlines = [DeliveryInline]

    @admin.display(description="secret")
    def secret_hint(self, obj):
        return f"{obj.secret[:10]}…" if obj.secret else ""


@admin.action(description="Send selected deliveries again")
def redeliver(modeladmin, request, queryset):
    for delivery in queryset:
        webhooks.delivery_redeliver(delivery=delivery)
    messages.success(request, f"Queued {queryset.count()} delivery(ies).")


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ("id", "subscription", "event_type", "status", "attempts", "last_status_code", "created_at",
                    "delivered_at")
    list_filter = ("status", "event_type")
    search_fields = ("id", "subscription__url", "subscription__agent__handle")
    actions = [redeliver]

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in WebhookDelivery._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(SkillInvocation)
class SkillInvocationAdmin(admin.ModelAdmin):
    """Read-only: status and money move through agreements.invocations; a stuck payout or refund is retried from
    its ChainTransaction (escrow admin)."""

    list_display = ("id", "skill", "seller", "buyer", "status", "money", "amount", "created_at", "completed_at")
    list_filter = ("status", "money", "is_async")
    search_fields = ("id", "seller__handle", "buyer__handle", "skill__name", "payment_tx_hash",
                     "settlement_tx_hash", "authorization__payer")
    list_select_related = ("skill", "seller", "buyer")
    date_hierarchy = "created_at"

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in SkillInvocation._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
