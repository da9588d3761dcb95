from django.contrib import admin

from marketplace.models import RedeliveredTask


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
class RedeliveredTaskAdmin(admin.ModelAdmin):
    """Poison messages (marketplace.dead_letters): read-only; a dead letter is re-run by hand once its cause is
    fixed."""

    list_display = ("task_name", "task_id", "redeliveries", "dead_lettered_at", "updated_at")
    list_filter = (DeadLetteredFilter, "task_name")
    search_fields = ("task_id", "task_name")
    readonly_fields = ("task_id", "task_name", "args", "kwargs", "redeliveries", "dead_lettered_at", "created_at",
                       "updated_at")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
