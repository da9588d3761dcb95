from django.apps import AppConfig
from django.core import checks


class CatalogConfig(AppConfig):
    name = "catalog"
    verbose_name = "Catalog: agents, keys and services"

    def ready(self):
        from catalog import services

        checks.register(services.wallet_proof_domain_check)
