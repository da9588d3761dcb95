"""Compare every funded agreement with the escrow contract, and report the chain indexer's lag, the events it
could not apply, the skill invocations whose payment a reorg took after their seller was called, the direct
purchases whose payment a reorg took after they were counted paid, the nonce fills the old bytes of the
transaction they cancel were mined in place of, and whether the node answers the PAYOUT_HEAD_TAG block payouts wait
for; exit 1 on any difference, unapplied event, reverted payment, outrun fill or unanswered tag (the chain is the
truth). It also lists, without failing, the escrows reclaimed for the buyer with
usage charged that was never proposed (the seller unpaid: the contract allows nothing else), and the disputes within
DISPUTE_TIMEOUT_WARNING_SECONDS of their on-chain timeout (unresolved then, the buyer gets the whole deposit back). An operator who looked into one acknowledges it (`--acknowledge ID` for an
event, `--acknowledge-invocation INVOCATION_ID` or `--acknowledge-agreement AGREEMENT_ID` for a reverted payment,
`--acknowledge-nonce-fill TRANSACTION_ID` for a fill, with `--reason ...` and `--operator USERNAME`; or the admin's
actions): it is still listed, and no longer fails the command. `--operator` names the operator's own account, held to
what the admin's action holds them to: an active staff account with the change permission on what it acknowledges,
owning neither party of the agreement or invocation whose money it decides (`operator_owns_a_party`); its username is what the row records."""

import uuid

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from agreements import selectors as agreement_selectors
from agreements import services as agreement_services
from agreements.models import FUNDED_STATUSES, SettlementModel, SkillInvocation, UsageAgreement
from escrow import indexer, relayer, selectors, services
from escrow.models import ChainEvent, ChainTransaction
from marketplace.errors import ApplicationError
from marketplace.shown_text import printable

def _describe(event: ChainEvent) -> str:
    return (f"event {event.name} in block {event.block_number} (tx {event.tx_hash}, log {event.log_index}) for "
            f"agreement {event.agreement_id} not applied: {event.error}")


def _describe_reverted(invocation: SkillInvocation) -> str:
    settled = f", {invocation.money} by tx {invocation.settlement_tx_hash}" if invocation.settlement_tx_hash else ""
    return (f"invocation {invocation.public_id} ({invocation.skill.name} of {invocation.seller.handle}, "
            f"{invocation.amount} base units): its payment (tx {invocation.payment_tx_hash}) was taken off the chain "
            f"by a reorg after the seller was called{settled}, and could not run again: "
            f"{printable(invocation.payment_reverted_reason)}")


def _describe_reverted_purchase(agreement: UsageAgreement) -> str:
    # The service's name is the seller's text: escaped, it cannot rewrite the operator's terminal.
    return (f"direct purchase {agreement.pk} ({printable(agreement.service.name)} of {agreement.seller.handle}, "
            f"{agreement.deposit_amount} base units): its payment was taken off the chain by a reorg after it was "
            f"counted paid, and could not run again: {printable(agreement.payment_reverted_reason)}")


def _describe_seller_unpaid(agreement: UsageAgreement) -> str:
    return (f"agreement {agreement.pk} (refunded): the seller was not paid the {agreement.used} base units it earned: "
            f"nothing was proposed on-chain before the escrow's reclaimAfter, and the contract gave the whole deposit "
            f"back to the buyer")


def _describe_settled_below_usage(agreement: UsageAgreement) -> str:
    return (f"agreement {agreement.pk} (settled): the escrow paid the seller {agreement.seller_payout} of the "
            f"{agreement.used} base units charged: receipt {agreement.proposed_seq} of {agreement.usage_seq} was the "
            f"last proposed before the window closed")


def _describe_payout_deferred(event) -> str:
    return (f"agreement {event.agreement_id}: the token refused the escrow's {event.args['amount']} base units to "
            f"{event.args['party']} (tx {event.tx_hash}); claimable in the escrow until withdrawn")


def _describe_timing_out(dispute, now) -> str:
    return (f"dispute {dispute.pk}: times out about {dispute.times_out_at:%Y-%m-%d %H:%M:%S %Z} "
            f"({selectors.dispute_time_left(dispute, now=now)}); "
            + ("a resolution was submitted" if dispute.resolving else
               "resolve it (admin: Disputes), or the buyer gets the whole deposit back"))


def _describe_outrun_fill(fill: ChainTransaction) -> str:
    return (f"nonce fill {fill.pk} (nonce {fill.nonce}): the old bytes of the transaction it cancels "
            f"({fill.context.get(relayer.CANCELS)}) were mined in its place (tx {fill.mined_tx_hash}, block "
            f"{fill.mined_block_number}) and ran: what they did may be done twice (by its successor or a retry)")


def _payouts_unreleasable(blocker: str) -> list[str]:
    """The node does not answer its PAYOUT_HEAD_TAG block (`blocker` says how): no payout or refund waiting for its
    payment's finality is sent (nor any held later) until it does."""
    if not blocker:
        return []
    return [f"{selectors.transactions_waiting_for_finality().count()} payout(s) or refund(s) cannot be released: "
            f"{blocker}; none is sent until the node answers it"]


def _receipt_signers_unconfigured() -> list[str]:
    """Open escrows naming a receipt signer whose key is configured nowhere: their usage cannot be charged."""
    return [f"{escrows} open escrow(s) name receipt signer {signer}, whose key is configured neither as "
            f"RECEIPT_SIGNER_PRIVATE_KEY nor in RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS: their usage cannot be charged "
            f"until it is" for signer, escrows in agreement_selectors.escrows_naming_unconfigured_signers().items()]


def _uuids(ids: list[str], what: str) -> list[uuid.UUID]:
    try:
        return [uuid.UUID(each) for each in ids]
    except ValueError as error:
        raise CommandError(f"Not {what} id among {' '.join(ids)}") from error


# What each acknowledgement takes: the change permission on its rows, as the admin's action (`may_operate`).
_ACKNOWLEDGE_PERMISSION = {"acknowledge": "escrow.change_chainevent",
                           "acknowledge_invocation": "agreements.change_skillinvocation",
                           "acknowledge_agreement": "agreements.change_usageagreement",
                           "acknowledge_nonce_fill": "escrow.change_chaintransaction"}


def _operator(username: str, acknowledging: list[str]):
    """The account acknowledging (`acknowledging`: the options given): an active staff account with each one's
    permission. A name typed freely (the OS user by default) recorded anyone, and left the rule that an operator does
    not write off their own agent's payment with nobody to apply it to."""
    if not username:
        raise CommandError("Name your operator account: --operator USERNAME (recorded with the acknowledgement).")
    account = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: username}).first()
    if account is None or not (account.is_active and account.is_staff):
        raise CommandError(f"No active staff account {username!r}: --operator names an operator's own account.")
    missing = sorted({_ACKNOWLEDGE_PERMISSION[option] for option in acknowledging} - {
        permission for permission in _ACKNOWLEDGE_PERMISSION.values() if account.has_perm(permission)})
    if missing:
        raise CommandError(f"{username} may not acknowledge these: the permission {', '.join(missing)} is missing.")
    return account


def _invocation_pks(public_ids: list[str]) -> list:
    pks = [agreement_selectors.invocation_pk(public_id) for public_id in public_ids]
    if None in pks:
        raise CommandError(f"Not an invocation id: {public_ids[pks.index(None)]}")
    return pks


class Command(BaseCommand):
    help = ("Compare the database with the escrow contract for every funded agreement; report the chain indexer's "
            "lag and the contract events it could not apply.")

    def add_arguments(self, parser):
        parser.add_argument("--acknowledge", type=int, nargs="+", metavar="EVENT_ID", default=[],
                            help="Acknowledge these unapplied chain events first (ids as in the admin's Chain "
                                 "events); requires --reason.")
        parser.add_argument("--acknowledge-invocation", nargs="+", metavar="INVOCATION_ID", default=[],
                            help="Acknowledge the reverted payments of these skill invocations first (inv_...); "
                                 "requires --reason.")
        parser.add_argument("--acknowledge-agreement", nargs="+", metavar="AGREEMENT_ID", default=[],
                            help="Acknowledge the reverted payments of these direct purchases first; requires "
                                 "--reason.")
        parser.add_argument("--acknowledge-nonce-fill", nargs="+", metavar="TRANSACTION_ID", default=[],
                            help="Acknowledge these nonce fills outrun by the old bytes of the transaction they "
                                 "cancel first (ids as in the admin's Chain transactions); requires --reason.")
        parser.add_argument("--reason", default="", help="Why the acknowledged events or payments need no action.")
        parser.add_argument("--operator", default="", metavar="USERNAME",
                            help="Your operator account (an active staff user with the change permission on what "
                                 "you acknowledge): required to acknowledge, recorded with it.")

    def handle(self, *args, **options):
        acknowledging = [option for option in _ACKNOWLEDGE_PERMISSION if options[option]]
        account = _operator(options["operator"], acknowledging) if acknowledging else None
        acknowledged_by = {"operator": account, "reason": options["reason"]}
        if options["acknowledge"]:
            self._acknowledge_with(indexer.events_acknowledge, "unapplied event(s)", acknowledged_by,
                                   events=ChainEvent.objects.filter(pk__in=options["acknowledge"]))
        if options["acknowledge_invocation"]:
            self._acknowledge_with(agreement_services.reverted_payments_acknowledge,
                                   "reverted invocation payment(s)", acknowledged_by,
                                   payments=SkillInvocation.objects.filter(
                                       pk__in=_invocation_pks(options["acknowledge_invocation"])))
        if options["acknowledge_agreement"]:
            self._acknowledge_with(agreement_services.reverted_payments_acknowledge, "reverted direct payment(s)",
                                   acknowledged_by, payments=UsageAgreement.objects.filter(
                                       pk__in=_uuids(options["acknowledge_agreement"], "an agreement")))
        if options["acknowledge_nonce_fill"]:
            self._acknowledge_with(services.nonce_fills_acknowledge, "nonce fill(s)", acknowledged_by,
                                   fills=ChainTransaction.objects.filter(
                                       pk__in=_uuids(options["acknowledge_nonce_fill"], "a transaction")))
        agreements = UsageAgreement.objects.filter(status__in=FUNDED_STATUSES, settlement_model=SettlementModel.ESCROW)
        problems = selectors.reconciliation_mismatches(agreements=agreements.iterator())
        problems += [_describe(event) for event in selectors.indexer_unapplied_events()]
        reverted = [(SkillInvocation, _describe_reverted), (UsageAgreement, _describe_reverted_purchase)]
        problems += [describe(row) for of, describe in reverted
                     for row in agreement_selectors.payments_reverted(of=of)]
        problems += [_describe_outrun_fill(fill) for fill in selectors.nonce_fills_outrun()]
        tag_block, blocker = selectors.payout_tag_block()  # the node asked once
        problems += _payouts_unreleasable(blocker)
        problems += _receipt_signers_unconfigured()
        for line in problems:
            self.stdout.write(line)
        for agreement in agreement_selectors.agreements_reclaimed_with_seller_unpaid().iterator():
            self.stdout.write(_describe_seller_unpaid(agreement))  # agrees with the chain: no mismatch
        for agreement in agreement_selectors.agreements_settled_below_their_usage().iterator():
            self.stdout.write(_describe_settled_below_usage(agreement))  # the chain's payout, recorded: no mismatch
        for event in selectors.payouts_deferred().iterator():
            self.stdout.write(_describe_payout_deferred(event))  # the chain's credit, recorded: no mismatch
        now = timezone.now()
        for dispute in selectors.disputes_timing_out(before=now + settings.DISPUTE_TIMEOUT_WARNING):
            self.stdout.write(_describe_timing_out(dispute, now))  # the arbiter's to-do, no mismatch
        acknowledged = [*((event, _describe(event)) for event in selectors.indexer_unapplied_events(acknowledged=True)),
                        *((fill, _describe_outrun_fill(fill)) for fill in selectors.nonce_fills_outrun(acknowledged=True))]
        for row, description in acknowledged:
            self._acknowledged(row.acknowledged_by, row.acknowledged_at, row.acknowledgement_reason, description)
        for of, describe in reverted:
            for row in agreement_selectors.payments_reverted(of=of, acknowledged=True):
                self._acknowledged(row.payment_reversal_acknowledged_by, row.payment_reversal_acknowledged_at,
                                   row.payment_reversal_acknowledgement_reason, describe(row))
        self._report_lag()
        self._report_finality_holds(tag_block, blocker)
        if problems:
            raise CommandError(f"{len(problems)} mismatch(es) between the database and the chain.")
        self.stdout.write(self.style.SUCCESS(f"Consistent: {agreements.count()} funded agreement(s) checked."))

    def _acknowledged(self, by: str, at, reason: str, description: str) -> None:
        self.stdout.write(f"acknowledged by {by} at {at:%Y-%m-%d %H:%M:%S %Z} ({reason}): {description}")

    def _acknowledge_with(self, acknowledge, what: str, acknowledged_by: dict, **selected) -> None:
        try:
            count = acknowledge(**selected, **acknowledged_by)
        except ApplicationError as error:
            raise CommandError(f"{error.message} ({error.code})") from error
        self.stdout.write(f"Acknowledged {count} {what}.")

    def _report_finality_holds(self, tag_block: int | None, blocker: str) -> None:
        """Payouts and refunds held for their payment's finality: waiting is no mismatch, but an operator sees how
        many, for which block the oldest waits, and where the node's tag is (`selectors.payout_tag_block`)."""
        held = selectors.transactions_waiting_for_finality()
        oldest = held.order_by("created_at").first()
        if oldest is None or not settings.PAYOUT_HEAD_TAG:
            return
        tagged = blocker or f"the node's {settings.PAYOUT_HEAD_TAG} block is {tag_block}"
        self.stdout.write(f"Payouts: {held.count()} held for their payment's finality, the oldest waiting for block "
                          f"{oldest.held_until_block}; {tagged}.")

    def _report_lag(self) -> None:
        lag = selectors.indexer_lag()
        if lag is None:
            self.stdout.write("Indexer: no escrow contract configured.")
            return
        line = (f"Indexer: applied up to block {lag.indexed_to}, chain head {lag.head}: {lag.lag} block(s) behind "
                f"(CHAIN_CONFIRMATIONS {settings.CHAIN_CONFIRMATIONS}, limit {settings.INDEXER_MAX_LAG_BLOCKS}).")
        self.stdout.write(self.style.WARNING(line) if lag.lag > settings.INDEXER_MAX_LAG_BLOCKS else line)
