"""The schema endpoint under concurrent first requests (found by the schemathesis runs, which start together)."""

import subprocess
import sys

import pytest
from drf_spectacular.generators import SchemaGenerator

# A fresh process: drf-spectacular's shared state is only raced while the first schema is being generated.
FIRST_REQUESTS_TOGETHER = """
import os, threading
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
import django
django.setup()
from django.test import Client
# One request first: the middleware's metrics are a process-wide singleton that concurrent first middleware
# loads would race on (a test-client artefact; a server loads its middleware once).
Client().get("/healthz")
start, statuses = threading.Barrier(8), []
def fetch():
    client = Client()
    start.wait()
    statuses.append(client.get("/api/schema/?format=json").status_code)
threads = [threading.Thread(target=fetch) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(sorted(statuses))
"""


@pytest.mark.slow
def test_concurrent_first_schema_requests_all_succeed():
    result = subprocess.run([sys.executable, "-c", FIRST_REQUESTS_TOGETHER], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip().splitlines()[-1] == str([200] * 8), result.stderr[-2000:]


@pytest.mark.django_db
def test_the_schema_is_generated_once_per_process_not_per_request(anon, monkeypatch):
    """Anyone may fetch it, unthrottled, and generating it took ~0.7 s of CPU under a lock held for the whole
    process: a few clients fetching it in a loop held every web thread, the metered proxy's too."""
    generated = []
    real = SchemaGenerator.get_schema
    monkeypatch.setattr(SchemaGenerator, "get_schema", lambda *args, **kwargs: generated.append(1) or real(
        *args, **kwargs))

    first = anon.get("/api/schema/?format=json")
    assert first.status_code == 200 and first.json()["paths"]["/catalog/search"]
    for query in ("?format=json", "?format=json&version=other", "?format=yaml", ""):
        again = anon.get(f"/api/schema/{query}")
        assert again.status_code == 200, again.content
    assert anon.get("/api/schema/?format=json").content == first.content
    assert "paths:" in anon.get("/api/schema/?format=yaml").content.decode()
    assert len(generated) <= 1  # none when an earlier test of this process generated it


@pytest.mark.django_db
def test_every_operation_taking_a_body_documents_the_body_refusals(anon):
    """A body larger than the platform reads is 413 `request_too_large`, one compressed or in another charset than
    UTF-8 415 `unsupported_content_encoding` / `unsupported_charset`, on every operation that reads one; the schema
    listed neither, so a client generated from it had no type for those answers."""
    schema = anon.get("/api/schema/?format=json").json()
    taking_a_body = {(path, method): operation for path, item in schema["paths"].items()
                     for method, operation in item.items() if isinstance(operation, dict) and "requestBody" in operation}
    assert len(taking_a_body) > 20
    for (path, method), operation in taking_a_body.items():
        for status_code, code in (("413", "request_too_large"), ("415", "unsupported_media_type")):
            response = operation["responses"].get(status_code)
            assert response is not None, (method, path, status_code)
            content = response["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Error"}
            assert [example["value"]["error"]["code"] for example in content["examples"].values()] == [code]


@pytest.mark.django_db
def test_every_operation_but_the_proxys_documents_the_too_many_query_fields_refusal(anon, settings):
    """Every API view answers a query string of more fields than Django reads 400 `too_many_query_fields`, GET
    operations too (tests/marketplace/test_query_strings.py); the schema documented it on none. The metered proxy
    forwards its query string unread."""
    schema = anon.get("/api/schema/?format=json").json()
    operations = {(path, method): operation for path, item in schema["paths"].items()
                  for method, operation in item.items() if isinstance(operation, dict)}
    refusing = {key: operation for key, operation in operations.items()
                if not operation["operationId"].startswith("metered_proxy_")}
    assert len(refusing) > 60 and ("/healthz", "get") in refusing and len(refusing) < len(operations)
    for (path, method), operation in operations.items():
        content = operation["responses"]["400"]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/Error"}, (method, path)
        examples = {example["value"]["error"]["code"]: example["value"]["error"]["details"]
                    for example in content["examples"].values()}
        if (path, method) in refusing:
            assert examples["too_many_query_fields"] == {"max_fields": settings.DATA_UPLOAD_MAX_NUMBER_FIELDS}
        else:
            assert "too_many_query_fields" not in examples, (method, path)


@pytest.mark.django_db
def test_the_masumi_registry_deregistration_publishes_its_body(anon):
    """`DELETE /registry/` takes agentIdentifier and network in its body (Masumi's wire format); drf-spectacular
    publishes no body for a DELETE, so a client generated from the schema could not send them. A DELETE without a
    declared body publishes none still."""
    schema = anon.get("/api/schema/?format=json").json()
    deletes = {item["delete"]["operationId"]: item["delete"] for item in schema["paths"].values() if "delete" in item}
    body = deletes.pop("masumi_registry_deregister")["requestBody"]
    assert body["required"] is True
    ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"agentIdentifier", "network"} <= set(schema["components"]["schemas"][ref]["required"])
    assert deletes and [o for o in deletes.values() if "requestBody" in o] == []
