"""Who is the client? The socket peer, or behind trusted proxies the forwarded address.

The forwarding header is read from the right: the right-most address that is not a trusted
proxy is the client, since everything to its left was written by the client itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["IPAddress", "client_address", "forwarded_entries", "ip_identifier", "parse_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IPAddress | None:
    """An address from a peer or forwarding-header entry, or None if it is not one.

    Accepts `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:443`, quoted values
    (RFC 7239) and zone ids; IPv4-mapped IPv6 becomes IPv4, so one client has one identity
    whatever stack the proxy used.
    """
    text = text.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_entries(values: Iterable[str], *, rfc7239: bool) -> list[str]:
    """Addresses of a forwarding header in order, left (client side) to right."""
    entries: list[str] = []
    for value in values:
        for element in value.split(","):
            if not rfc7239:
                entries.append(element)
                continue
            # `Forwarded: for=192.0.2.60;proto=http;by=203.0.113.43`: only `for` matters;
            # an element without one still counts as a hop (it yields an unusable entry).
            found = ""
            for pair in element.split(";"):
                key, _, val = pair.partition("=")
                if key.strip().lower() == "for":
                    found = val
            entries.append(found)
    return entries


def client_address(
    peer: IPAddress,
    forwarded: Sequence[str],
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> IPAddress:
    """The client's address: the peer, unless the peer is a trusted proxy.

    Behind trusted proxies, walk the forwarded entries from the right; the first address
    outside `trusted` is the client. An unparseable entry stops the walk at the hop that
    wrote it (a trusted proxy), since nothing to its left can be attributed. When every hop
    is trusted, the left-most is the origin.
    """

    def is_trusted(address: IPAddress) -> bool:
        return any(address in network for network in trusted)

    if not is_trusted(peer):
        return peer
    client = peer
    for entry in reversed(forwarded):
        address = parse_address(entry)
        if address is None:
            return client
        client = address
        if not is_trusted(address):
            return address
    return client


def ip_identifier(address: IPAddress, *, ipv6_prefix: int) -> str:
    """`192.0.2.1`, or an IPv6 network such as `2001:db8:1:2::/64`.

    One IPv6 subscriber usually holds a whole /64 (often more) and can pick a fresh address
    per request, so limiting single IPv6 addresses would limit nobody.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    return ipaddress.IPv6Network((address, ipv6_prefix), strict=False).with_prefixlen
