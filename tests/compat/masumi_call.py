"""Run by tests/compat/masumi_env.py with the masumi environment's python: one call of a Masumi client library,
unmodified. Argument: a JSON object {"op", ...}; prints the call's answer as JSON on the last line."""

import asyncio
import json
import logging
import sys

from masumi import Config, Payment, Purchase, create_masumi_input_hash, create_masumi_output_hash
from masumi_crewai.config import Config as CrewaiConfig
from masumi_crewai.registry import Agent as CrewaiAgent


def purchase(args: dict) -> Purchase:
    return Purchase(config=Config(payment_service_url=args["node"], payment_api_key=args["key"]),
                    network="Preprod", **args["purchase"])


def payment(args: dict) -> Payment:
    return Payment(agent_identifier=args["agent_identifier"], network="Preprod",
                   config=Config(payment_service_url=args["node"], payment_api_key=args["key"]))


def crewai_agent(args: dict) -> CrewaiAgent:
    config = CrewaiConfig(payment_service_url=args["node"], payment_api_key=args["key"], registry_api_key=args["key"])
    return CrewaiAgent(config=config, network="Preprod", **args["agent"])


OPERATIONS = {
    "input_hash": lambda a: create_masumi_input_hash(a["input_data"], a["identifier"]),
    "output_hash": lambda a: create_masumi_output_hash(a["output"], a["identifier"]),
    "purchase_create": lambda a: asyncio.run(purchase(a).create_purchase_request()),
    "purchase_request_refund": lambda a: asyncio.run(purchase(a).request_refund()),
    "purchase_cancel_refund_request": lambda a: asyncio.run(purchase(a).cancel_refund_request()),
    "purchase_status": lambda a: asyncio.run(payment(a).check_purchase_status(a["purchase_id"])),
    "payment_create": lambda a: asyncio.run(payment(a).create_payment_request()),
    "payment_status": lambda a: asyncio.run(payment(a).check_payment_status_by_identifier(a["blockchain_identifier"])),
    "payment_submit_result": lambda a: asyncio.run(payment(a).complete_payment(a["blockchain_identifier"],
                                                                               a["output"])),
    "payment_authorize_refund": lambda a: asyncio.run(payment(a).authorize_refund(a["blockchain_identifier"])),
    "registry_register": lambda a: asyncio.run(crewai_agent(a).register()),
    "registry_check": lambda a: asyncio.run(crewai_agent(a).check_registration_status(a["wallet"])),
}

if __name__ == "__main__":
    logging.disable(logging.CRITICAL)  # the libraries log to stdout; the answer is the last line
    arguments = json.loads(sys.argv[1])
    print(json.dumps(OPERATIONS[arguments["op"]](arguments)))
