"""The receipt signer keys (marketplace.chainconfig): the lookup by address, and the checks of the configuration."""

import io

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from eth_account import Account

from marketplace import chainconfig


def test_a_receipt_signer_key_is_found_by_its_address_among_the_current_and_retired_ones(settings):
    current, retired = Account.create(), Account.create()
    settings.RECEIPT_SIGNER_PRIVATE_KEY, settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = current.key.hex(), [
        "not a key", retired.key.hex()]
    assert chainconfig.receipt_signer_key(current.address) == current.key.hex()
    assert chainconfig.receipt_signer_key(retired.address.lower()) == retired.key.hex()
    assert chainconfig.receipt_signer_key(Account.create().address) is None
    assert chainconfig.receipt_signer_key("") is None
    # An agreement whose escrow's signer was never recorded: the current key; a recorded one not kept: none.
    assert chainconfig.agreement_receipt_signer_key("") == current.key.hex()
    assert chainconfig.agreement_receipt_signer_key(Account.create().address) is None


def test_the_current_receipt_signer_key_listed_as_retired_is_a_warning_of_a_rotation_that_did_not_happen(settings):
    current = Account.create()
    settings.RECEIPT_SIGNER_PRIVATE_KEY, settings.RECEIPT_SIGNER_RETIRED_PRIVATE_KEYS = current.key.hex(), [
        "0x" + current.key.hex().removeprefix("0x")]
    [warning] = chainconfig.signing_keys_check()
    assert warning.id == "marketplace.W002" and current.address in warning.msg


def test_a_malformed_receipt_signer_key_fails_the_system_check(settings):
    settings.RECEIPT_SIGNER_PRIVATE_KEY = "0x" + "zz" * 32
    with pytest.raises(SystemCheckError, match="marketplace.E001.*RECEIPT_SIGNER_PRIVATE_KEY is not a valid"):
        call_command("check", stdout=io.StringIO())


def test_a_relayer_key_is_found_by_its_address_among_the_current_and_retired_ones(settings):
    current, retired = Account.create(), Account.create()
    settings.RELAYER_PRIVATE_KEY, settings.RELAYER_RETIRED_PRIVATE_KEYS = current.key.hex(), [retired.key.hex()]
    assert chainconfig.relayer_key(current.address.lower()) == current.key.hex()
    assert chainconfig.relayer_key(retired.address) == retired.key.hex()
    assert chainconfig.relayer_key(Account.create().address) is None
    assert chainconfig.relayer_addresses() == [current.address, retired.address]


def test_a_malformed_retired_relayer_key_fails_the_system_check_and_the_current_one_listed_is_a_warning(settings):
    current = Account.create()
    settings.RELAYER_PRIVATE_KEY, settings.RELAYER_RETIRED_PRIVATE_KEYS = current.key.hex(), [
        "not a key", current.key.hex()]
    messages = {(message.id, message.msg) for message in chainconfig.signing_keys_check()}
    assert messages == {("marketplace.E001", "RELAYER_RETIRED_PRIVATE_KEYS: entry 1 is not a valid private key"),
                        ("marketplace.W002", f"RELAYER_RETIRED_PRIVATE_KEYS lists the current RELAYER_PRIVATE_KEY "
                                             f"({current.address}).")}
