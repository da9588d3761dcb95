"""The operator's own networks, as the SSRF guard (marketplace.outbound) reads them: the platform's public addresses
(OUTBOUND_DENIED_NETWORKS) and the NAT64 prefixes of its hosts' network (OUTBOUND_NAT64_PREFIXES). Parsed here,
apart from the guard, so that settings.py refuses a bad entry at start rather than at the first outbound call."""

import ipaddress

from django.core.exceptions import ImproperlyConfigured

# RFC 6052 section 2.2: the lengths a NAT64 prefix may have.
NAT64_PREFIX_LENGTHS = (32, 40, 48, 56, 64, 96)
_U_OCTET = 0xFF << 56  # bits 64 to 71 of an IPv6 address: zero in every address RFC 6052 defines


def networks(setting: str, entries: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Each entry a network (`203.0.113.0/24`) or an address (`203.0.113.7`). ImproperlyConfigured, naming
    `setting`, for anything else, a network with host bits set included: the address or its network, which one was
    meant cannot be told."""
    parsed = []
    for entry in entries:
        try:
            parsed.append(ipaddress.ip_network(entry))
        except ValueError as exc:
            raise ImproperlyConfigured(f"{setting}: {entry!r} is not an IP network or address ({exc}).") from None
    return tuple(parsed)


def nat64_prefixes(setting: str, entries: list[str]) -> tuple[ipaddress.IPv6Network, ...]:
    """Each entry an IPv6 prefix of a length RFC 6052 allows, with bits 64 to 71 zero; else ImproperlyConfigured."""
    prefixes = []
    for prefix in networks(setting, entries):
        if not isinstance(prefix, ipaddress.IPv6Network) or prefix.prefixlen not in NAT64_PREFIX_LENGTHS:
            raise ImproperlyConfigured(f"{setting}: {prefix} is not a NAT64 prefix, an IPv6 one of length /32, /40, "
                                       "/48, /56, /64 or /96 (RFC 6052).")
        if int(prefix.network_address) & _U_OCTET:
            raise ImproperlyConfigured(f"{setting}: {prefix} sets bits 64 to 71, which RFC 6052 keeps zero.")
        prefixes.append(prefix)
    return tuple(prefixes)


def embedded_ipv4(ip: ipaddress.IPv6Address, prefix: ipaddress.IPv6Network) -> ipaddress.IPv4Address | None:
    """The IPv4 address that `ip`, under the NAT64 `prefix`, embeds (RFC 6052 section 2.2): the 32 bits after the
    prefix, bits 64 to 71 (the u-octet) skipped. None when those bits are not zero: no address the RFC defines,
    which a translator may still take for one."""
    value = int(ip)
    if prefix.prefixlen == 96:
        return ipaddress.IPv4Address(value & 0xFFFF_FFFF)
    if value & _U_OCTET:
        return None
    without_u_octet = (value >> 64) << 56 | value & ((1 << 56) - 1)  # 120 bits: the prefix, the address, the suffix
    return ipaddress.IPv4Address(without_u_octet >> (120 - prefix.prefixlen - 32) & 0xFFFF_FFFF)
