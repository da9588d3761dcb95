from django.apps import AppConfig
from django.core import checks


class CatalogConfig(AppConfig):
    name = "catalog"
    verbose_name = "Catalog: agents, keys and services"

    def ready(self):
        from catalog import services
        from marketplace.account_checks import account_check_register

        checks.register(services.wallet_proof_domain_check)
        # The user admin (marketplace's) refuses a conflicted operator's change of another owner's account (its
        # deactivation, its name, its password), as catalog's admin refuses that of their agents and credentials.
        account_check_register(services.operator_owns_a_seller_check)
