from django.apps import AppConfig


class EscrowConfig(AppConfig):
    name = "escrow"
