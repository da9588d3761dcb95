"""The demo seller that `make run` starts behind the demo services."""

import threading
import time
from http.server import ThreadingHTTPServer

import httpx
import pytest

from marketplace.management.commands.demo_seller import DemoSeller


@pytest.fixture
def demo_seller():
    DemoSeller.job_seconds = 0.2
    server = ThreadingHTTPServer(("127.0.0.1", 0), DemoSeller)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_masumi_job_api_and_metered_echo(demo_seller):
    with httpx.Client(base_url=demo_seller, timeout=5) as client:
        assert client.get("/availability").json()["status"] == "available"
        assert client.post("/start_job", json={}).status_code == 400
        job = client.post("/start_job", json={"input_data": "solar panels"}).json()
        assert job["job_id"] and job["payment_id"]
        assert client.get("/status", params={"job_id": job["job_id"]}).json()["status"] == "running"
        deadline = time.monotonic() + 5
        while (done := client.get("/status", params={"job_id": job["job_id"]}).json())["status"] == "running":
            assert time.monotonic() < deadline, "the 0.2 s job never completed"
            time.sleep(0.05)
        assert done["status"] == "completed" and "solar panels" in done["result"]
        assert client.get("/status", params={"job_id": "nope"}).status_code == 404

        echo = client.post("/extract", content=b"x" * 2500)
        assert echo.status_code == 200 and echo.headers["X-Usage-Units"] == "2"
