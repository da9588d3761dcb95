from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace platform"

    def ready(self):
        from django.contrib import admin

        from marketplace import dead_letters, metrics

        metrics.task_failures_count()
        dead_letters.panels_register()

        admin.site.index_template = "admin/marketplace_index.html"  # links the operators' dashboard
