"""Peer IDs: written `a.b` (0..255 each), a 16-bit number a*256+b (docs/configuration.md)."""

from __future__ import annotations

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


class TunnelNet:
    """The group's /16: maps peer IDs to tunnel addresses and back."""

    def __init__(self, net: tuple[int, int]):
        self.prefix = (net[0] << 24) | (net[1] << 16)
        self.network = ipaddress.IPv4Network((self.prefix, 16))

    def address(self, peer_id: int) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.prefix | peer_id)

    def id_of(self, packed_v4: bytes) -> int | None:
        """The peer ID inside a packed IPv4 address, or None when outside the net."""
        value = int.from_bytes(packed_v4, "big")
        if value & 0xFFFF0000 != self.prefix:
            return None
        return value & 0xFFFF
