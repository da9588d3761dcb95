"""Checks an upper app registers on what an operator does to an owner's account in the user admin (which lives here,
below the apps that own agents): the layering forbids this app importing them, so each registers its own, as
`policies.services.approval_handler_register` lets agreements decide its approvals.

A check is called as `check(owner_id=, operator=, does=)` and raises an `ApplicationError` to refuse (catalog's
`operator_owns_a_seller_check`: an operator who owns a seller agent neither shuts a competitor's account out, nor
takes its way in, nor renames it)."""

from collections.abc import Callable

AccountCheck = Callable[..., None]
_checks: list[AccountCheck] = []


def account_check_register(check: AccountCheck) -> None:
    """`check` runs before an operator changes an owner's account (deactivates it, renames it, sets its password);
    registered once however often it is asked."""
    if check not in _checks:
        _checks.append(check)


def account_check(*, account, operator, does: str) -> None:
    """Raises the first registered check's refusal of `operator` doing `does` ("deactivates this account") to
    `account`."""
    for check in _checks:
        check(owner_id=account.pk, operator=operator, does=does)
