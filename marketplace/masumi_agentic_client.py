"""Client of the Masumi Agentic Service API (MIP-003) that `masumi` sellers implement on their base URL.

Two versions of `POST /start_job`, chosen per service (catalog's `masumi_protocol_version`):
- "1", the seed's: {"input_data"} -> {"job_id", "payment_id"};
- "2", the masumi library's (>= 1.0): {"identifier_from_purchaser", "input_data"} -> {"id", "blockchainIdentifier",
  "payByTime", ...}: the job id is `id`, the payment id `blockchainIdentifier` (the seller's payment request).
Both: `GET /status?job_id=` -> {"status", "result"?, ...}; `GET /availability` -> {"status": "available" |
"unavailable", "uptime"?, "message"?}.
Every failure (network, timeout, non-2xx, a body that is not the documented shape, too large or nested too
deep) is one `AgenticServiceError`, so callers decide what to retry without knowing httpx.
"""

from dataclasses import dataclass

import httpx
from django.conf import settings

from marketplace import bounded_json, outbound


_client = outbound.guarded_client(timeout=httpx.Timeout(10.0))  # each request passes MASUMI_SERVICE_TIMEOUT


class AgenticServiceError(Exception):
    pass


@dataclass(frozen=True)
class StartedJob:
    job_id: str
    payment_id: str


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    status: str
    result: str | None


@dataclass(frozen=True)
class Availability:
    available: bool
    message: str


def _request(method: str, base_url: str, path: str, **kwargs) -> dict:
    url = base_url.rstrip("/") + path
    try:
        with (outbound.deadline(settings.MASUMI_SERVICE_TIMEOUT),
              _client.stream(method, url, timeout=settings.MASUMI_SERVICE_TIMEOUT, **kwargs) as response):
            if response.status_code >= 300:
                raise AgenticServiceError(f"{method} {path}: HTTP {response.status_code}")
            body = outbound.json_answer(response, max_bytes=settings.UPSTREAM_ANSWER_MAX_BYTES)
    except outbound.HTTPX_UNREACHABLE as error:
        raise AgenticServiceError(f"{method} {path}: {type(error).__name__}: {error}") from error
    except bounded_json.InvalidJSON as error:
        raise AgenticServiceError(f"{method} {path}: the answer is not usable JSON ({error.reason})") from error
    if not isinstance(body, dict):
        raise AgenticServiceError(f"{method} {path}: the answer is not a JSON object")
    return body


def _text(body: dict, name: str, path: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > 250:
        raise AgenticServiceError(f"{path}: `{name}` missing or not a string of 1-250 characters")
    return value


SEED_PROTOCOL, PURCHASER_ID_PROTOCOL = "1", "2"


def start_job(*, base_url: str, protocol_version: str, input_data, identifier_from_purchaser: str) -> StartedJob:
    if protocol_version == SEED_PROTOCOL:
        body = _request("POST", base_url, "/start_job", json={"input_data": input_data})
        return StartedJob(job_id=_text(body, "job_id", "/start_job"),
                          payment_id=_text(body, "payment_id", "/start_job"))
    body = _request("POST", base_url, "/start_job",
                    json={"identifier_from_purchaser": identifier_from_purchaser, "input_data": input_data})
    return StartedJob(job_id=_text(body, "id", "/start_job"),
                      payment_id=_text(body, "blockchainIdentifier", "/start_job"))


def job_status(*, base_url: str, job_id: str) -> JobStatus:
    """An answer naming another job (the seed's `job_id`) is an error, not this job's. (The masumi library's `id`
    names the status answer, a fresh UUID each time, not the job.)"""
    body = _request("GET", base_url, "/status", params={"job_id": job_id})
    if "job_id" in body and body["job_id"] != job_id:
        raise AgenticServiceError("/status: the answer is for another job (`job_id` is not the one asked for)")
    result = body.get("result")
    if result is not None and not isinstance(result, str):
        raise AgenticServiceError("/status: `result` is not a string")
    return JobStatus(job_id=job_id, status=_text(body, "status", "/status"), result=result)


def availability(*, base_url: str) -> Availability:
    """An error or any status but "available" counts as unavailable (the seed: 500 when it cannot serve)."""
    try:
        body = _request("GET", base_url, "/availability")
    except AgenticServiceError as error:
        return Availability(available=False, message=str(error)[:250])
    message = body.get("message")
    return Availability(available=body.get("status") == "available",
                        message=message[:250] if isinstance(message, str) else "")
