"""The chain client's contract objects: web3 makes a class of each contract from its ABI (5-7 ms of CPU), so each is
built once per node, address and ABI, and a setting that changes any of them gets a new one."""

from eth_utils import to_checksum_address

from escrow import chain

ESCROW = to_checksum_address("0x" + "11" * 20)
TOKEN = to_checksum_address("0x" + "22" * 20)


def test_each_contract_is_built_once_and_anew_when_its_node_or_address_changes(settings):
    settings.USAGE_ESCROW_ADDRESS, settings.USDC_ADDRESS = ESCROW, TOKEN
    escrow, token = chain.escrow_contract(), chain.token_contract()
    assert chain.escrow_contract() is escrow and chain.token_contract() is token
    assert (escrow.address, token.address) == (ESCROW, TOKEN)
    assert escrow.abi != token.abi

    settings.USAGE_ESCROW_ADDRESS = TOKEN
    assert chain.escrow_contract().address == TOKEN and chain.escrow_contract().abi == escrow.abi
    assert chain.token_contract(ESCROW).address == ESCROW and chain.token_contract(ESCROW).abi == token.abi

    settings.CHAIN_RPC_URL = "http://127.0.0.1:9"
    assert chain.escrow_contract().w3 is chain.w3() is not escrow.w3
