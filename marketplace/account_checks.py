"""Checks an upper app registers on what an operator does to an owner's account in the user admin (which lives here,
below the apps that own agents): the layering forbids this app importing them, so each registers its own, as
`policies.services.approval_handler_register` lets agreements decide its approvals.

A check is called as `check(owner_id=, operator=, does=)` and raises an `ApplicationError` to refuse (catalog's
`operator_owns_a_seller_check`: an operator who owns a seller agent shuts no competitor's account out)."""

from collections.abc import Callable

AccountCheck = Callable[..., None]
_deactivation_checks: list[AccountCheck] = []


def account_deactivation_check_register(check: AccountCheck) -> None:
    """`check` runs before an operator deactivates an owner's account; registered once however often it is asked."""
    if check not in _deactivation_checks:
        _deactivation_checks.append(check)


def account_deactivation_check(*, account, operator) -> None:
    """Raises the first registered check's refusal of `operator` deactivating `account`."""
    for check in _deactivation_checks:
        check(owner_id=account.pk, operator=operator, does="deactivates this account")
