from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps
from django.core import checks


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace platform"

    def ready(self):
        from django.core.signals import request_started

        from marketplace import caching, chainconfig, dead_letters, metrics, middleware, money, outbound

        request_started.connect(middleware.keep_server_path_info, dispatch_uid="marketplace.keep_server_path_info")

        metrics.task_failures_count()
        dead_letters.panels_register()
        checks.register(chainconfig.signing_keys_check)
        checks.register(caching.shared_cache_check, deploy=True)
        checks.register(outbound.private_addresses_check, deploy=True)
        checks.register(metrics.metrics_token_check, deploy=True)
        checks.register(money.amount_limit_check)


class OperatorAdminConfig(admin_apps.AdminConfig):
    """django.contrib.admin with the project's site as `admin.site` (every app registers its admin there)."""

    default = False  # INSTALLED_APPS names it; "marketplace" alone still means MarketplaceConfig
    default_site = "marketplace.second_factor.OperatorAdminSite"
