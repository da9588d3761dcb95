"""Agreement statuses belong to agreements: escrow asks its predicates and status sets (agreements.models) or
names a status through `AgreementStatus`, and never spells one as a string (issue 15)."""

import ast
from pathlib import Path

from agreements.models import AgreementStatus

ESCROW = Path(__file__).resolve().parents[2] / "escrow"
STATUSES = frozenset(AgreementStatus.values)


def _is_status(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in STATUSES


def _literals(node: ast.AST) -> list[ast.Constant]:
    """The status strings `node` is, or holds as a tuple, list or set literal."""
    if _is_status(node):
        return [node]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [element for element in node.elts if _is_status(element)]
    return []


def _names_a_status(name: str | None) -> bool:
    return bool(name) and ("status" in name.lower())


def _target_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def status_literals(source: str) -> list[tuple[int, str]]:
    """(line, value) of every string that is used as an agreement status: compared with something, passed or
    stored as a status, a set of statuses, or a table keyed by status. Other strings that happen to share a
    status's spelling (a counter named "expired", the contract's state "settled") are left alone."""
    found: list[ast.Constant] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += _literals(operand)
        elif isinstance(node, ast.MatchValue):
            found += _literals(node.value)
        elif isinstance(node, ast.keyword) and _names_a_status(node.arg):
            found += _literals(node.value)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_names_a_status(_target_name(target)) for target in targets) and node.value is not None:
                found += _literals(node.value)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(key.value, str) and _names_a_status(key.value):
                    found += _literals(value)
            if len(node.keys) > 1 and all(key is not None and _is_status(key) for key in node.keys):
                found += node.keys
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) > 1 and all(
                _is_status(element) for element in node.elts):
            found += node.elts
    return sorted({(literal.lineno, literal.value) for literal in found})


def escrow_status_literals(root: Path = ESCROW) -> list[str]:
    return [f"{path.relative_to(root.parent)}:{line}: {value!r}"
            for path in sorted(root.rglob("*.py")) if "migrations" not in path.parts
            for line, value in status_literals(path.read_text())]


def test_escrow_spells_no_agreement_status():
    assert escrow_status_literals() == [], (
        "Use agreements' predicates and status sets (agreements.models) or AgreementStatus, not a string")


def test_the_check_sees_each_way_a_status_is_spelled():
    source = '''
if agreement.status != "active" or agreement.status in ("settled", "refunded"):
    pass
UsageAgreement.objects.filter(status__in=["accepted"], agreement__status="paid")
payload = {"status": "submitting"}
FUNDED = ["in_challenge", "disputed"]
EXPECTED = {"settling": 1, "expired": 2}
agreement.status = "paying"
match agreement.status:
    case "cancelled":
        pass
'''
    assert [value for _line, value in status_literals(source)] == [
        "active", "refunded", "settled", "accepted", "paid", "submitting", "disputed", "in_challenge", "expired",
        "settling", "paying", "cancelled"]


def test_the_check_leaves_other_strings_alone():
    source = '''
done = {"expired": 0, "proposed": 0, "finalizing": 0}
done["expired"] += 1
metering.completion_request(agreement=agreement, reason="expired")
closed = onchain["state"] in ESCROW_CLOSED_STATES
raise Conflict("Nothing to do.", code="payment_failed")
'''
    assert status_literals(source) == []
