"""The SSRF guard and the operator's own network: the platform's public addresses (OUTBOUND_DENIED_NETWORKS) are
refused as private ones are, and an address under one of its NAT64 prefixes (OUTBOUND_NAT64_PREFIXES) is judged by
the IPv4 address it reaches, as one under the well-known prefix is."""

import runpy

import pytest
from django.core.exceptions import ImproperlyConfigured

import marketplace.settings
from agreements.models import WebhookDelivery
from tests.agreements.helpers import proposal
from tests.catalog.factories import register_service, service_data
from tests.catalog.test_registry import registration
from tests.conftest import error_code
from tests.marketplace.conftest import active_agreement, refused_by_the_guard
from tests.support.public_addresses import routed

pytestmark = pytest.mark.django_db

# Stand-ins for the platform's load balancer (IPv4 and IPv6) and a name that resolves to it.
PLATFORM = ["93.184.215.0/24", "2606:2800:21f::/48"]
LOAD_BALANCER = "93.184.215.14"
PLATFORM_NAME = "lb.platform.example"

THE_PLATFORMS_OWN = [
    f"https://{LOAD_BALANCER}/api",
    f"https://{PLATFORM_NAME}/api",
    f"https://[::ffff:{LOAD_BALANCER}]/api",  # IPv4-mapped
    f"https://[64:ff9b::{LOAD_BALANCER}]/api",  # through the well-known NAT64 prefix
    "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/api",
]


@pytest.mark.parametrize("url", THE_PLATFORMS_OWN)
def test_a_service_cannot_point_its_upstream_at_the_platforms_own_public_addresses(guard_on, settings, seller_api,
                                                                                   url):
    settings.OUTBOUND_DENIED_NETWORKS = PLATFORM
    with routed(LOAD_BALANCER, "127.0.0.1", names=(PLATFORM_NAME,)):
        response = seller_api.post("/agents/services", service_data(upstream_base_url=url))
    assert response.status_code == 400, response.content
    assert error_code(response) == "address_not_allowed"


def test_other_public_addresses_are_still_accepted(guard_on, settings, seller_api):
    settings.OUTBOUND_DENIED_NETWORKS = PLATFORM
    response = seller_api.post("/agents/services", service_data(upstream_base_url="https://93.184.216.34/api"))
    assert response.status_code == 201, response.content


def test_a_webhook_or_masumi_registration_cannot_point_at_the_platforms_own_addresses(guard_on, settings, seller,
                                                                                      seller_api):
    settings.OUTBOUND_DENIED_NETWORKS = PLATFORM
    webhook = seller_api.post("/webhooks", {"url": f"http://{LOAD_BALANCER}/hook"})
    assert webhook.status_code == 400 and error_code(webhook) == "address_not_allowed", webhook.content
    masumi = seller_api.post("/registry", registration(seller, apiBaseUrl=f"https://{LOAD_BALANCER}:3001"))
    assert masumi.status_code == 400 and error_code(masumi) == "address_not_allowed", masumi.content


@pytest.mark.chain
@pytest.mark.parametrize("guard", ["on", "off"])
def test_a_proxied_call_to_an_upstream_resolving_to_the_platforms_own_address_is_refused_and_charges_nothing(
        escrow_chain, http_server, settings, django_capture_on_commit_callbacks, guard):
    """Registered while the name resolved elsewhere; it now resolves to the platform's load balancer. The denied
    networks hold with ALLOW_PRIVATE_UPSTREAMS too: the operator named them."""
    port = http_server.url.rsplit(":", 1)[1]
    with routed(LOAD_BALANCER, "127.0.0.1", names=(PLATFORM_NAME,)):
        active = active_agreement(escrow_chain, django_capture_on_commit_callbacks,
                                  f"http://{PLATFORM_NAME}:{port}/api")
        settings.ALLOW_PRIVATE_UPSTREAMS = guard == "off"
        settings.OUTBOUND_DENIED_NETWORKS = PLATFORM
        refused_by_the_guard(active, http_server)

        settings.OUTBOUND_DENIED_NETWORKS = []
        assert active.buyer_api.get(f"{active.proxy}/translate").status_code == 200  # reachable, but for the list


def test_a_webhook_delivery_to_the_platforms_own_address_fails(settings, seller, seller_api, buyer_api, http_server,
                                                               django_capture_on_commit_callbacks):
    service = register_service(seller)
    port = http_server.url.rsplit(":", 1)[1]
    assert seller_api.post("/webhooks", {"url": f"http://{LOAD_BALANCER}:{port}/hooks"}).status_code == 201
    settings.ALLOW_PRIVATE_UPSTREAMS = False
    settings.OUTBOUND_DENIED_NETWORKS = PLATFORM
    with routed(LOAD_BALANCER, "127.0.0.1"), django_capture_on_commit_callbacks(execute=True):
        assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    assert http_server.requests == []
    [delivery] = WebhookDelivery.objects.all()
    assert "not allowed" in delivery.last_error and delivery.status == "pending", delivery.last_error


# RFC 6052 section 2.4's table of addresses, with a global prefix for its documentation one (2001:db8 -> 2a02:db8):
# (the network's NAT64 prefix, the address embedding 10.0.0.1, the address embedding 93.184.215.14).
NAT64_PREFIXES = [
    ("2a02:db8::/32", "2a02:db8:a00:1::", "2a02:db8:5db8:d70e::"),
    ("2a02:db8:100::/40", "2a02:db8:10a:0:1::", "2a02:db8:15d:b8d7:e::"),
    ("2a02:db8:122::/48", "2a02:db8:122:a00:0:100::", "2a02:db8:122:5db8:d7:e00::"),
    ("2a02:db8:122:300::/56", "2a02:db8:122:30a:0:1::", "2a02:db8:122:35d:b8:d70e::"),
    ("2a02:db8:122:344::/64", "2a02:db8:122:344:a:0:100:0", "2a02:db8:122:344:5d:b8d7:e00:0"),
    ("2a02:db8:122:344::/96", "2a02:db8:122:344::10.0.0.1", "2a02:db8:122:344::93.184.215.14"),
    # The local-use prefix (RFC 8215), refused as someone else's translator unless it is the network's own.
    ("64:ff9b:1::/48", "64:ff9b:1:a00:0:100::", "64:ff9b:1:5db8:d7:e00::"),
]


@pytest.mark.parametrize(("prefix", "private", "public"), NAT64_PREFIXES)
def test_an_address_under_the_networks_nat64_prefix_is_judged_by_the_ipv4_address_it_reaches(
        guard_on, settings, seller_api, prefix, private, public):
    settings.OUTBOUND_NAT64_PREFIXES = [prefix]
    refused = seller_api.post("/agents/services", service_data(upstream_base_url=f"https://[{private}]/api"))
    assert refused.status_code == 400 and error_code(refused) == "address_not_allowed", refused.content
    accepted = seller_api.post("/agents/services", service_data(upstream_base_url=f"https://[{public}]/api"))
    assert accepted.status_code == 201, accepted.content


def test_an_address_under_a_nat64_prefix_whose_u_octet_is_not_zero_is_refused(guard_on, settings, seller_api):
    """RFC 6052 keeps bits 64 to 71 zero: such an address is none a translator defines; it still goes to one."""
    settings.OUTBOUND_NAT64_PREFIXES = ["2a02:db8:122:344::/64"]
    response = seller_api.post("/agents/services",
                               service_data(upstream_base_url="https://[2a02:db8:122:344:ff5d:b8d7:e00:0]/api"))
    assert response.status_code == 400 and error_code(response) == "address_not_allowed", response.content


def test_an_ipv4_address_of_the_platform_is_denied_through_the_networks_nat64_prefix_too(guard_on, settings,
                                                                                         seller_api):
    settings.OUTBOUND_NAT64_PREFIXES = ["2a02:db8:122:344::/96"]
    settings.OUTBOUND_DENIED_NETWORKS = PLATFORM
    response = seller_api.post("/agents/services",
                               service_data(upstream_base_url=f"https://[2a02:db8:122:344::{LOAD_BALANCER}]/api"))
    assert response.status_code == 400 and error_code(response) == "address_not_allowed", response.content


def test_a_webhook_delivery_through_the_networks_nat64_prefix_to_loopback_fails(
        settings, seller, seller_api, buyer_api, http_server, django_capture_on_commit_callbacks):
    service = register_service(seller)
    port = http_server.url.rsplit(":", 1)[1]
    translated = "2a02:db8:122:344::7f00:1"  # 127.0.0.1 under the network's prefix
    assert seller_api.post("/webhooks", {"url": f"http://[{translated}]:{port}/hooks"}).status_code == 201
    settings.ALLOW_PRIVATE_UPSTREAMS = False
    settings.OUTBOUND_NAT64_PREFIXES = ["2a02:db8:122:344::/96"]
    with routed(translated, "127.0.0.1"), django_capture_on_commit_callbacks(execute=True):
        assert buyer_api.post("/usage-agreements", proposal(service)).status_code == 201
    assert http_server.requests == []
    [delivery] = WebhookDelivery.objects.all()
    assert "not allowed" in delivery.last_error and delivery.status == "pending", delivery.last_error


@pytest.mark.parametrize(("name", "value"), [
    ("OUTBOUND_DENIED_NETWORKS", "93.184.215.0/24,lb.platform.example"),  # a name, not an address
    ("OUTBOUND_DENIED_NETWORKS", "93.184.215.14/24"),  # host bits set: which was meant, the address or the /24?
    ("OUTBOUND_NAT64_PREFIXES", "2a02:db8::/33"),  # RFC 6052 allows /32, /40, /48, /56, /64 and /96 only
    ("OUTBOUND_NAT64_PREFIXES", "10.64.0.0/16"),  # not IPv6
    ("OUTBOUND_NAT64_PREFIXES", "2a02:db8:122:344:ff00::/96"),  # bits 64 to 71 (the u-octet) not zero
])
def test_a_network_setting_that_does_not_parse_stops_startup_naming_the_setting(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ImproperlyConfigured, match=name):
        runpy.run_path(marketplace.settings.__file__)


def test_the_network_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("OUTBOUND_DENIED_NETWORKS", "93.184.215.0/24, 2606:2800:21f::/48,203.0.113.7")
    monkeypatch.setenv("OUTBOUND_NAT64_PREFIXES", "2a02:db8:122:344::/96")
    loaded = runpy.run_path(marketplace.settings.__file__)
    assert loaded["OUTBOUND_DENIED_NETWORKS"] == ["93.184.215.0/24", "2606:2800:21f::/48", "203.0.113.7"]
    assert loaded["OUTBOUND_NAT64_PREFIXES"] == ["2a02:db8:122:344::/96"]
