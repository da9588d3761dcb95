"""The SDK's checks of what the marketplace signs (proxied calls, webhook deliveries) during a secret rotation's
overlap, when a message carries the new secret's signature and the replaced one's: a receiver verifies with either
secret it holds, and nothing it refused before now passes."""

import time

from sdk import proxy_signature, webhook_signature

CALL = {"agreement_id": "a1", "call_seq": 12, "method": "POST", "path": "/v1/run"}
BODY = b'{"id":"evt_1","type":"agreement.active"}'


def proxied_headers(secret: str, previous_secret: str = "", *, timestamp: int | None = None) -> dict:
    timestamp = int(time.time()) if timestamp is None else timestamp
    headers = {"X-Marketplace-Agreement": "a1", "X-Marketplace-Call-Seq": "12",
               "X-Marketplace-Timestamp": str(timestamp),
               "X-Marketplace-Signature": proxy_signature.sign(secret, timestamp=timestamp, **CALL)}
    if previous_secret:
        headers[proxy_signature.PREVIOUS_SIGNATURE_HEADER] = proxy_signature.sign(previous_secret,
                                                                                  timestamp=timestamp, **CALL)
    return headers


def verified(secret: str, headers: dict, **call) -> bool:
    return proxy_signature.verify(secret, headers, method=call.get("method", "POST"), path=call.get("path", "/v1/run"))


def test_a_proxied_call_of_an_overlap_verifies_with_the_new_secret_or_the_replaced_one():
    headers = proxied_headers("psk_new", "psk_old")
    assert verified("psk_new", headers) and verified("psk_old", headers)
    assert not verified("psk_other", headers)
    # The first header is the new secret's alone, byte for byte what a verifier of one signature compares.
    assert headers["X-Marketplace-Signature"] == proxied_headers("psk_new")["X-Marketplace-Signature"]
    # Either signature is still bound to its method, path and time.
    assert not verified("psk_old", headers, method="GET")
    assert not verified("psk_old", headers, path="/admin")
    late = int(headers["X-Marketplace-Timestamp"]) + proxy_signature.TOLERANCE_SECONDS + 1
    assert not proxy_signature.verify("psk_old", headers, method="POST", path="/v1/run", now=late)


def test_a_proxied_call_after_the_overlap_verifies_with_the_new_secret_only():
    headers = proxied_headers("psk_new")
    assert verified("psk_new", headers) and not verified("psk_old", headers)


def test_the_previous_signature_header_cannot_pass_a_call_number_in_another_spelling():
    headers = proxied_headers("psk_new", "psk_old")
    for spelling in ("012", "+12", " 12"):
        assert not verified("psk_old", {**headers, "X-Marketplace-Call-Seq": spelling})


def test_a_signature_in_other_than_ascii_is_refused_not_crashed_on():
    """hmac.compare_digest raises TypeError on a non-ASCII str: a hostile header must be a refusal."""
    headers = proxied_headers("psk_new")
    assert not verified("psk_new", {**headers, "X-Marketplace-Signature": "v1=\u00e9"})
    signed_by_another = proxied_headers("psk_other")
    assert not verified("psk_new", {**signed_by_another, proxy_signature.PREVIOUS_SIGNATURE_HEADER: "v1=\u00e9"})
    assert not webhook_signature.verify("whsec_new", BODY, f"t={int(time.time())},v1=\u00e9")


def test_a_webhook_of_an_overlap_verifies_with_either_secret_and_names_the_new_one_first():
    now = int(time.time())
    header = webhook_signature.sign("whsec_new", BODY, now, previous_secret="whsec_old")
    single = webhook_signature.sign("whsec_new", BODY, now)
    assert header.startswith(single + ",v1=")  # t, the new secret's v1, then the replaced one's
    assert webhook_signature.verify("whsec_new", BODY, header)
    assert webhook_signature.verify("whsec_old", BODY, header)
    assert not webhook_signature.verify("whsec_other", BODY, header)
    assert not webhook_signature.verify("whsec_old", BODY + b" ", header)
    assert not webhook_signature.verify("whsec_old", BODY, header, now=now + webhook_signature.TOLERANCE_SECONDS + 1)
    assert webhook_signature.verify("whsec_new", BODY, header.replace(",", ", "))  # Pægents writes "t=.., v1=.."


def test_a_webhook_after_the_overlap_verifies_with_the_new_secret_only():
    header = webhook_signature.sign("whsec_new", BODY, int(time.time()))
    assert webhook_signature.verify("whsec_new", BODY, header)
    assert not webhook_signature.verify("whsec_old", BODY, header)


def test_a_webhook_header_reads_one_timestamp_in_its_one_spelling():
    now = int(time.time())
    header = webhook_signature.sign("whsec_new", BODY, now)
    signature = header.split(",", 1)[1]
    for malformed in (f"t=0{now},{signature}", f"t=+{now},{signature}", f"t={now},t={now},{signature}",
                      signature, f"t={now},{signature},junk", ""):
        assert not webhook_signature.verify("whsec_new", BODY, malformed), malformed
    assert webhook_signature.verify("whsec_new", BODY, f"{header},v0=ignored")  # unknown schemes are skipped


def test_a_replayed_call_with_a_signed_header_given_twice_is_refused():
    """A replay of a signed call (within the tolerance) with a second `X-Marketplace-Call-Seq` of a number never
    served: the seller's framework reads one of the two (werkzeug's and Starlette's `headers[...]` the first,
    `items()` yields both), so a verifier that checks the other passes a call number the seller then takes as new.
    Any header the signature covers given twice, in any case, is a refusal."""
    from werkzeug.datastructures import Headers

    signed = proxied_headers("psk_new")
    for name in ("X-Marketplace-Call-Seq", "x-marketplace-call-seq", "X-Marketplace-Timestamp",
                 "X-Marketplace-Agreement"):
        replayed = Headers([(name, "999"), *signed.items()])
        assert replayed.get(name) == "999"  # what the seller's dedupe would read
        assert not verified("psk_new", replayed), name
        assert not verified("psk_new", {name.lower(): "999", **signed}), name  # a plain dict, two spellings
    assert verified("psk_new", Headers(list(signed.items())))


def test_a_replayed_webhook_under_another_event_id_header_is_refused():
    """`Marketplace-Event-Id`, which receivers dedupe on, is outside the signature: a delivery replayed within the
    tolerance with that header changed passed as a new event. With the header given, `verify` holds it to the
    body's signed `id`."""
    header = webhook_signature.sign("whsec_new", BODY, int(time.time()))
    assert webhook_signature.verify("whsec_new", BODY, header, event_id="evt_1")
    assert not webhook_signature.verify("whsec_new", BODY, header, event_id="evt_2")
    assert not webhook_signature.verify("whsec_new", BODY, header, event_id="")
    for body in (b'{"type":"agreement.active"}', b'["evt_1"]', b'{"id":1}', b"not json", b"[" * 100 + b"]" * 100):
        signed = webhook_signature.sign("whsec_new", body, int(time.time()))
        assert webhook_signature.verify("whsec_new", body, signed)  # the signature alone still passes
        assert not webhook_signature.verify("whsec_new", body, signed, event_id="1"), body


def test_a_receiver_with_no_secret_verifies_no_webhook():
    """A receiver whose secret setting is unset (`os.environ.get("WEBHOOK_SECRET", "")`) verified with the empty key,
    which anyone can sign with: every forged delivery passed."""
    forged = webhook_signature.sign("", BODY, int(time.time()))
    assert not webhook_signature.verify("", BODY, forged)


def test_a_seller_with_no_proxy_secret_verifies_no_call():
    """A seller whose proxy secret setting is unset verified with the empty key, which anyone can sign with: every
    forged call passed as the marketplace's."""
    assert not verified("", proxied_headers(""))


def test_a_replayed_webhook_under_another_event_type_header_is_refused():
    """`Marketplace-Event-Type` is outside the signature too: a receiver dispatching on it took an `agreement.active`
    replayed within the tolerance under `agreement.settled` for a settlement. With the header given, `verify` holds
    it to the body's signed `type`."""
    header = webhook_signature.sign("whsec_new", BODY, int(time.time()))
    assert webhook_signature.verify("whsec_new", BODY, header, event_id="evt_1", event_type="agreement.active")
    assert not webhook_signature.verify("whsec_new", BODY, header, event_type="agreement.settled")
    assert not webhook_signature.verify("whsec_new", BODY, header, event_id="evt_1", event_type="")
    untyped = b'{"id":"evt_1"}'
    assert not webhook_signature.verify("whsec_new", untyped, webhook_signature.sign("whsec_new", untyped,
                                                                                     int(time.time())),
                                        event_type="agreement.active")


def test_a_timestamp_too_large_for_a_float_is_refused_not_crashed_on():
    """Anyone can post to a webhook receiver or call a seller's upstream: a timestamp of 309 digits or more (within
    int()'s 4300) raised OverflowError from the tolerance check (`time.time() - timestamp`), a 500 where a forged
    message is refused."""
    huge = "9" * 400
    forged_webhook = f"t={huge},v1={'0' * 64}"
    assert not webhook_signature.verify("whsec_new", BODY, forged_webhook)
    forged_call = {**proxied_headers("psk_new"), "X-Marketplace-Timestamp": huge}
    assert not verified("psk_new", forged_call)
    # Within the tolerance, counted without rounding: 300 s away passes, 300.5 s away does not.
    now = int(time.time())
    header = webhook_signature.sign("whsec_new", BODY, now)
    assert webhook_signature.verify("whsec_new", BODY, header, now=now + 300)
    assert not webhook_signature.verify("whsec_new", BODY, header, now=now + 300.5)
    assert not webhook_signature.verify("whsec_new", BODY, header, now=now - 300.5)
    assert proxy_signature.verify("psk_new", proxied_headers("psk_new", timestamp=now), method="POST",
                                  path="/v1/run", now=now - 300)
