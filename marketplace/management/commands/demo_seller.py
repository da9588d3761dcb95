"""The demo seller for `make run`: a small real upstream at 127.0.0.1:8001 behind the demo services.

- `GET /availability`, `POST /start_job`, `GET /status?job_id=` speak the Masumi Agentic Service API (jobs finish
  `--job-seconds` after they start, with a result string);
- any other path answers 200 with JSON echoing the call; per-unit services are told the units served in
  `X-Usage-Units` (one unit per 1,000 bytes of request body, at least one), as the metered proxy expects.

It does not check `X-Marketplace-Signature`: the proxy secret is shown once to whoever registered the service
(see `sdk.proxy_signature.verify` for a seller that does).
"""

import json
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from django.core.management.base import BaseCommand


class DemoSeller(BaseHTTPRequestHandler):
    jobs: dict[str, dict] = {}
    job_seconds = 3.0
    started = time.time()

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass

    def _answer(self, status: int, body: dict, headers: dict | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/availability":
            return self._answer(200, {"status": "available", "uptime": str(int(time.time() - self.started)),
                                      "message": "demo seller"})
        if url.path == "/status":
            job = self.jobs.get(parse_qs(url.query).get("job_id", [""])[0])
            if job is None:
                return self._answer(404, {"detail": "job not found"})
            done = time.time() - job["started"] >= self.job_seconds
            return self._answer(200, {"job_id": job["job_id"], "status": "completed" if done else "running",
                                      **({"result": f"Brief on {job['input_data']!r}: demand is growing."}
                                         if done else {})})
        return self._echo(b"")

    def do_POST(self):
        body = self._body()
        if urlsplit(self.path).path == "/start_job":
            try:
                input_data = json.loads(body)["input_data"]
            except (ValueError, KeyError, TypeError):
                return self._answer(400, {"detail": "input_data is required"})
            job = {"job_id": str(uuid.uuid4()), "payment_id": uuid.uuid4().hex, "input_data": input_data,
                   "started": time.time()}
            self.jobs[job["job_id"]] = job
            return self._answer(200, {"job_id": job["job_id"], "payment_id": job["payment_id"]})
        return self._echo(body)

    do_PUT = do_PATCH = do_DELETE = do_POST

    def _echo(self, body: bytes) -> None:
        units = max(1, len(body) // 1000)
        self._answer(200, {"result": f"demo answer for {self.command} {urlsplit(self.path).path}",
                           "received_bytes": len(body)}, {"X-Usage-Units": str(units)})


class Command(BaseCommand):
    help = "Serve the demo seller's upstream (HTTP echo and the Masumi job API) for `make run`."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=8001)
        parser.add_argument("--job-seconds", type=float, default=3.0)

    def handle(self, *args, port, job_seconds, **options):
        DemoSeller.job_seconds = job_seconds
        server = ThreadingHTTPServer(("127.0.0.1", port), DemoSeller)
        self.stdout.write(f"Demo seller listening on http://127.0.0.1:{port}")
        try:
            server.serve_forever()
        finally:
            server.server_close()
