"""Drives the published `paegents` SDK (PyPI, unmodified) against the marketplace. Runs in the SDK's own virtual
environment (it needs x402<0.3; the project pins x402>=2.20), so it imports nothing from this repository.

One request per line on stdin, {"api_url": ..., "agents": {name: {"id", "key"}}, "calls": [{"as": name, "op": ...,
"args": {...}}]}, answered by one line on stdout: a JSON list with a result per call, {"ok": <the SDK's answer,
dataclasses as dicts>} or {"error": {"type", "status", "body", "message"}}. A failed call does not stop the ones
after it. The process serves requests until stdin closes (starting it is the slow part).
"""

import dataclasses
import json
import sys

import paegents
from paegents.agent_payments import RecordUsageRequest, ServiceRegistration, UsageAgreementRequest


def _metered(sdk, args):
    return sdk.create_metered_client(args.pop("agreement_id"))


def _verify_webhook(sdk, args):
    return paegents.agent_payments.verify_webhook_signature(args["header"], args["body"], args["secret"])


# Calls whose arguments are not plain keywords of an SDK method.
OPS = {
    "register_service": lambda sdk, a: sdk.register_service(ServiceRegistration(**a)),
    "create_usage_agreement": lambda sdk, a: sdk.create_usage_agreement(UsageAgreementRequest(**a)),
    "record_usage": lambda sdk, a: sdk.record_usage(a["agreement_id"], RecordUsageRequest(**a["request"])),
    "metered_get": lambda sdk, a: _metered(sdk, a).get(a["path"]),
    "metered_post": lambda sdk, a: _metered(sdk, a).post(a["path"], json=a.get("json")),
    "metered_status": lambda sdk, a: _metered(sdk, a).get_usage_status(),
    "build_direct_stablecoin_agreement": lambda sdk, a: paegents.build_direct_stablecoin_agreement(**a),
    "compute_stablecoin_fee_atomic": lambda sdk, a: paegents.compute_stablecoin_fee_atomic(**a),
    "verify_webhook_signature": _verify_webhook,
    "recover_credentials": lambda sdk, a: paegents.recover_credentials(sdk.api_url, **a),
}


def _json(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_json(item) for item in value]
    return value


def serve(request: dict) -> list[dict]:
    results = []
    for call in request["calls"]:
        agent = request["agents"].get(call.get("as"), {"id": "", "key": ""})
        sdk = paegents.AgentPaymentsSDK(request["api_url"], agent["id"], agent["key"])
        args = dict(call.get("args", {}))
        try:
            op = OPS.get(call["op"]) or (lambda sdk, a, name=call["op"]: getattr(sdk, name)(**a))
            results.append({"ok": _json(op(sdk, args))})
        except paegents.ApiError as error:
            results.append({"error": {"type": type(error).__name__, "status": error.status, "body": error.body,
                                      "message": str(error)}})
        except Exception as error:  # noqa: BLE001 - the client's own refusals (ValueError, KeyError) are results
            results.append({"error": {"type": type(error).__name__, "status": None, "body": None,
                                      "message": str(error)}})
    return results


def main() -> None:
    for line in sys.stdin:
        sys.stdout.write(json.dumps(serve(json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
