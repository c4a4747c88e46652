"""Peer IDs: written `a.b` (0..255 each), a 16-bit number a*256+b (docs/configuration.md)."""

from __future__ import annotations

import hashlib
import ipaddress

# 0.0, 0.1 and 255.255 are reserved: 0.0 is the network address,
# 255.255 the broadcast address of the /16, 0.1 is kept back as in the original.
RESERVED_IDS = frozenset({0x0000, 0x0001, 0xFFFF})


class IdError(ValueError):
    """A peer ID or tunnel net that cannot be used; the message is one plain sentence."""


def _two_octets(text: str, what: str, form: str) -> tuple[int, int]:
    """`a.b` with a and b in 0..255; IdError names `what` and the expected form."""
    if not isinstance(text, str):
        raise IdError(f"{what} {text!r} is not a string like '{form}'")
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise IdError(f"{what} {text!r} is not " + ("of the form a.b (e.g. 16.1)" if what == "peer ID"
                                                     else f"two octets like {form}"))
    a, b = int(parts[0]), int(parts[1])
    if a > 255 or b > 255:
        raise IdError(f"{what} {text!r} has " + ("a part" if what == "peer ID" else "an octet") + " above 255")
    return a, b


def parse_id(text: str) -> int:
    """Parse `a.b` into a 16-bit ID; raise IdError for bad or reserved IDs."""
    a, b = _two_octets(text, "peer ID", "16.1")
    value = a * 256 + b
    if value in RESERVED_IDS:
        raise IdError(f"peer ID {text!r} is reserved (0.0, 0.1 and 255.255 cannot be used)")
    return value


def format_id(peer_id: int) -> str:
    return f"{peer_id >> 8}.{peer_id & 0xFF}"


def parse_net(text: str) -> tuple[int, int]:
    """Parse the tunnel net `x.y` (two octets, e.g. 10.17)."""
    return _two_octets(text, "net", "10.17")


def group_prefix6(group: str) -> bytes:
    """The group's IPv6 /64 (8 bytes) when config `net6` is "auto": a unique
    local prefix (fd00::/8, RFC 4193) whose 40-bit global ID comes from the
    group name, so every member agrees on it and two groups do not collide."""
    return b"\xfd" + hashlib.sha256(b"alpaca-tunnel net6 " + group.encode()).digest()[:5] + b"\0\0"


def _hextet(octet: int) -> int:
    """An ID's octet written in an IPv6 address: its decimal digits as hex
    digits, so peer 16.1 is <prefix>::16:1."""
    return int(str(octet), 16)


def _octet(hextet: int) -> int | None:
    text = f"{hextet:x}"
    return int(text) if text.isdigit() and int(text) <= 255 else None


class TunnelNet:
    """The group's /16 (and its IPv6 /64, when it has one): maps peer IDs to
    tunnel addresses and back. Peer a.b is x.y.a.b and <prefix6>::a:b."""

    def __init__(self, net: tuple[int, int], prefix6: bytes | None = None):
        self.prefix = (net[0] << 24) | (net[1] << 16)
        self.network = ipaddress.IPv4Network((self.prefix, 16))
        self.prefix6 = prefix6
        self.network6 = ipaddress.IPv6Network((prefix6 + bytes(8), 64)) if prefix6 is not None else None

    def address(self, peer_id: int) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.prefix | peer_id)

    def address6(self, peer_id: int) -> ipaddress.IPv6Address | None:
        if self.prefix6 is None:
            return None
        return ipaddress.IPv6Address(self.prefix6 + bytes(4) + _hextet(peer_id >> 8).to_bytes(2, "big")
                                     + _hextet(peer_id & 0xFF).to_bytes(2, "big"))

    def id_of(self, packed: bytes) -> int | None:
        """The peer ID inside a packed IPv4 or IPv6 address, or None when outside the net."""
        if len(packed) == 4:
            value = int.from_bytes(packed, "big")
            if value & 0xFFFF0000 != self.prefix:
                return None
            return value & 0xFFFF
        if len(packed) != 16 or packed[:8] != self.prefix6 or packed[8:12] != b"\0\0\0\0":
            return None
        a, b = _octet(int.from_bytes(packed[12:14], "big")), _octet(int.from_bytes(packed[14:16], "big"))
        return None if a is None or b is None else a * 256 + b
