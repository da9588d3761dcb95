from django.contrib import admin, messages

from catalog import services
from catalog.models import Agent, ApiKey, OwnerToken, Service, Skill, Tag


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    can_delete = False
    fields = ("name", "prefix", "scope", "created_at", "expires_at", "revoked_at", "last_used_at")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False  # Keys are issued through the API or `manage.py issue_api_key`, which show the secret once.


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ("handle", "display_name", "owner", "wallet_address", "is_buyer", "is_seller", "is_active",
                    "created_at")
    list_filter = ("is_active", "is_buyer", "is_seller")
    search_fields = ("handle", "display_name", "wallet_address", "owner__username", "owner__email")
    readonly_fields = ("id", "created_at")
    inlines = [ApiKeyInline]


@admin.action(description="Revoke selected credentials")
def revoke_credentials(modeladmin, request, queryset):
    for credential in queryset:
        services.credential_revoke(credential=credential)
    messages.success(request, f"Revoked {queryset.count()} credential(s).")


class CredentialAdmin(admin.ModelAdmin):
    readonly_fields = ("prefix", "secret_digest", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    actions = [revoke_credentials]

    def has_add_permission(self, request):
        return False  # The secret must be shown once at creation, which the API and commands do.


@admin.register(ApiKey)
class ApiKeyAdmin(CredentialAdmin):
    list_display = ("prefix", "agent", "name", "scope", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = ("scope", "revoked_at")
    search_fields = ("prefix", "name", "agent__handle")
    list_select_related = ("agent",)


@admin.register(OwnerToken)
class OwnerTokenAdmin(CredentialAdmin):
    list_display = ("prefix", "owner", "name", "created_at", "expires_at", "revoked_at", "last_used_at")
    search_fields = ("prefix", "name", "owner__username")
    list_select_related = ("owner",)


class SkillInline(admin.TabularInline):
    model = Skill
    extra = 0
    can_delete = False
    readonly_fields = ("name", "description", "price", "path", "is_async", "timeout_seconds")

    def has_add_permission(self, request, obj=None):
        return False


@admin.action(description="Deregister selected services")
def deregister_services(modeladmin, request, queryset):
    for service in queryset:
        services.service_deregister(service=service, actor=None)
    messages.success(request, f"Deregistered {queryset.count()} service(s).")


@admin.register(Service)
class ServiceAdmin(admin.ModelAdmin):
    list_display = ("name", "seller", "state", "pricing_type", "unit_price", "token", "upstream_protocol",
                    "created_at")
    list_filter = ("state", "pricing_type", "upstream_protocol", "token")
    search_fields = ("name", "description", "keywords", "seller__handle", "id")
    exclude = ("search_vector",)
    list_select_related = ("seller",)
    inlines = [SkillInline]
    actions = [deregister_services]

    # Services change through the API (catalog.services keeps search data in step); operators read and deregister.
    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Service._meta.fields if f.name != "search_vector"] + ["tags"]

    def has_add_permission(self, request):
        return False


@admin.register(Tag)
class TagAdmin(admin.ModelAdmin):
    search_fields = ("name",)
