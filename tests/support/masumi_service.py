"""A small real Masumi agentic service (the seed's Agentic Service API) on loopback, for tests.

`POST /start_job` {"input_data"} -> {"job_id", "payment_id"} (with "identifier_from_purchaser" as well, the masumi
library's version: -> {"id", "blockchainIdentifier"}); `GET /status?job_id=` -> {"job_id", "status", "result"?};
`GET /availability` -> {"status", "uptime", "message"}. Behaviour is switched by `mode`:
- "result": a job is "running" on its first status check, then "completed" with `result_for(input_data)`;
- "never": jobs stay "running" forever;
- "unavailable": /availability answers "unavailable" (and start_job 503s).
`before_status`, when set, runs before each status answer (e.g. to let time pass while the seller answers).
"""

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def result_for(input_data) -> str:
    return f"summary of {json.dumps(input_data, sort_keys=True)}"


@dataclass
class MasumiService:
    mode: str = "result"
    jobs: dict = field(default_factory=dict)  # job_id -> {"input_data", "status_checks"}
    started: list = field(default_factory=list)  # input_data of every start_job, in order
    started_at: float = field(default_factory=time.time)
    server: ThreadingHTTPServer | None = None
    before_status: Callable[[], object] | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _status(self, job_id: str) -> tuple[int, dict]:
        job = self.jobs.get(job_id)
        if job is None:
            return 404, {"error": "job not found"}
        job["status_checks"] += 1
        if self.before_status is not None:
            self.before_status()
        if self.mode == "result" and job["status_checks"] > 1:
            return 200, {"job_id": job_id, "status": "completed", "result": result_for(job["input_data"])}
        return 200, {"job_id": job_id, "status": "running"}

    def _start(self, body: dict) -> tuple[int, dict]:
        if self.mode == "unavailable":
            return 503, {"error": "not taking jobs"}
        if "input_data" not in body:
            return 400, {"error": "input_data is required"}
        job_id = str(uuid.uuid4())
        self.jobs[job_id] = {"input_data": body["input_data"], "status_checks": 0}
        self.started.append(body["input_data"])
        if "identifier_from_purchaser" in body:
            return 200, {"id": job_id, "blockchainIdentifier": f"pay-{job_id}"}
        return 200, {"job_id": job_id, "payment_id": f"pay-{job_id}"}

    def _availability(self) -> tuple[int, dict]:
        status = "unavailable" if self.mode == "unavailable" else "available"
        return 200, {"status": status, "uptime": str(int(time.time() - self.started_at)),
                     "message": "maintenance" if status == "unavailable" else "ready"}

    def start(self) -> "MasumiService":
        service = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                url = urlsplit(self.path)
                if url.path == "/status":
                    self._answer(*service._status(parse_qs(url.query).get("job_id", [""])[0]))
                elif url.path == "/availability":
                    self._answer(*service._availability())
                else:
                    self._answer(404, {"error": "not found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                if urlsplit(self.path).path == "/start_job":
                    self._answer(*service._start(body))
                else:
                    self._answer(404, {"error": "not found"})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
