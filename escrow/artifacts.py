"""Compiled contract artifacts (ABI + bytecode) from ``escrow/contracts/build/``.

The JSON files there are written by ``node escrow/contracts/compile.js`` and committed; CI checks they are
fresh with ``node escrow/contracts/compile.js --check``. This module only reads them (no Django, no web3):

    >>> abi("UsageEscrow")[0]["type"]
    'constructor'
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

BUILD_DIR = Path(__file__).resolve().parent / "contracts" / "build"

USAGE_ESCROW = "UsageEscrow"
MOCK_USDC = "MockUSDC"
CONTRACT_NAMES = (USAGE_ESCROW, MOCK_USDC)


class ArtifactNotFound(FileNotFoundError):
    """No compiled artifact for the contract: run ``node escrow/contracts/compile.js``."""


@cache
def _load(name: str) -> dict[str, Any]:
    path = BUILD_DIR / f"{name}.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ArtifactNotFound(
            f"no artifact for contract {name!r} at {path}; run `node escrow/contracts/compile.js`"
        ) from exc
    data = json.loads(text)
    missing = {"contractName", "abi", "bytecode", "deployedBytecode", "sourceHash"} - set(data)
    if missing:
        raise ValueError(f"artifact {path} lacks {sorted(missing)}")
    return data


def load_artifact(name: str) -> dict[str, Any]:
    """The whole artifact ``{"contractName", "abi", "bytecode", "deployedBytecode", "sourceHash"}``.

    Read once per process and cached; a deep copy is returned so callers cannot alter the cache.
    """
    return copy.deepcopy(_load(name))


def abi(name: str) -> list[dict[str, Any]]:
    """The contract's ABI (a fresh list each call)."""
    return copy.deepcopy(_load(name)["abi"])


def bytecode(name: str) -> str:
    """Creation bytecode, ``0x``-prefixed hex."""
    return _load(name)["bytecode"]


def deployed_bytecode(name: str) -> str:
    """Runtime bytecode, ``0x``-prefixed hex (compare with ``eth_getCode``; the metadata tail included)."""
    return _load(name)["deployedBytecode"]


def source_hash(name: str) -> str:
    """sha256 over the sources, compiler version and settings the artifact was built from."""
    return _load(name)["sourceHash"]


def clear_cache() -> None:
    """Forget the cached artifacts (after recompiling in the same process)."""
    _load.cache_clear()
