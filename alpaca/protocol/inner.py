"""Just enough of an inner IP packet to route it (IPv4 and IPv6).

Only what forwarding needs is looked at: the addresses (for dst_id and the
loop guard) and whether the packet earns the extra early copy that TCP SYN
and DNS packets get (docs/protocol.md §7).
"""

from __future__ import annotations

_TCP, _UDP = 6, 17
_SYN, _ACK = 0x02, 0x10
DNS_PORT = 53


def version(packet: bytes) -> int:
    return packet[0] >> 4 if packet else 0


def addresses(packet: bytes) -> tuple[bytes, bytes] | None:
    """(src, dst) as packed bytes, or None when the packet is not IP or is truncated."""
    v = version(packet)
    if v == 4 and len(packet) >= 20:
        return packet[12:16], packet[16:20]
    if v == 6 and len(packet) >= 40:
        return packet[8:24], packet[24:40]
    return None


def _transport(packet: bytes) -> tuple[int, int] | None:
    """(protocol, offset of the transport header); IPv6 extension headers are not walked."""
    v = version(packet)
    if v == 4 and len(packet) >= 20:
        if int.from_bytes(packet[6:8], "big") & 0x1FFF:   # a later fragment
            return None
        return packet[9], (packet[0] & 0x0F) * 4
    if v == 6 and len(packet) >= 40:
        return packet[6], 40
    return None


def wants_early_copy(packet: bytes) -> bool:
    """A TCP SYN (not SYN-ACK... both: losing either stalls the handshake) or a DNS query/answer."""
    t = _transport(packet)
    if t is None:
        return False
    proto, off = t
    if proto == _TCP and len(packet) >= off + 14:
        return bool(packet[off + 13] & _SYN)
    if proto == _UDP and len(packet) >= off + 4:
        sport = int.from_bytes(packet[off:off + 2], "big")
        dport = int.from_bytes(packet[off + 2:off + 4], "big")
        return sport == DNS_PORT or dport == DNS_PORT
    return False

