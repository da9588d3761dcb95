"""The masumi library's own seller server (`masumi.create_masumi_app`, MIP-003 with MIP-004 hashes), unmodified, on
loopback in a thread, with this marketplace as its Masumi payment node.

Its /start_job asks the node for a payment (`POST /payment/`), watches it (`/payment/resolve-blockchain-identifier`)
until the funds are locked, runs the job and submits the result hash (`/payment/submit-result`).
"""

import asyncio
import json
import socket
import threading
import time

import uvicorn
from masumi import Config, create_masumi_app


def result_for(input_data) -> str:
    return f"summary of {json.dumps(input_data, sort_keys=True)}"


class MasumiSeller:
    def __init__(self, *, node_url: str, api_key: str, agent_identifier: str, seller_wallet: str):
        async def run_job(identifier_from_purchaser: str, input_data: dict) -> str:
            return result_for(input_data)

        app = create_masumi_app(config=Config(payment_service_url=node_url, payment_api_key=api_key),
                                agent_identifier=agent_identifier, network="Preprod",
                                start_job_handler=run_job, seller_vkey=seller_wallet)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, loop="asyncio", log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve(sockets=[self._socket])),
                                        name="masumi-seller", daemon=True)

    def start(self) -> "MasumiSeller":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the masumi seller server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
