"""Run by tests/compat/masumi_env.py with the masumi environment's python: the masumi library's seller server."""

import json
import sys

import uvicorn
from masumi import Config, create_masumi_app


def result_for(input_data) -> str:
    return f"summary of {json.dumps(input_data, sort_keys=True)}"


async def run_job(identifier_from_purchaser: str, input_data: dict) -> str:
    return result_for(input_data)


if __name__ == "__main__":
    options = json.loads(sys.argv[1])
    app = create_masumi_app(config=Config(payment_service_url=options["node_url"], payment_api_key=options["api_key"]),
                            agent_identifier=options["agent_identifier"], network="Preprod", start_job_handler=run_job,
                            seller_vkey=options["seller_wallet"])
    uvicorn.run(app, host="127.0.0.1", port=options["port"], log_level="warning", loop="asyncio")
