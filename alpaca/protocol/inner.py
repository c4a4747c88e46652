"""Just enough of an inner IP packet to route it (IPv4 and IPv6).

Only what forwarding needs is looked at: the addresses (for dst_id and the
loop guard) and whether the packet earns the extra early copy that TCP SYN
and DNS packets get (docs/protocol.md §7). And the one packet the core
writes itself: an ICMP "host unreachable" (ICMPv6 "address unreachable")
for a packet to a tunnel address no peer has (docs/protocol.md §6).
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



# ICMP types that report an error: never answered with another error (RFC 1122 3.2.2)
_ICMP, _ICMP_ERRORS = 1, frozenset((3, 4, 5, 11, 12))
QUOTE_LIMIT = 576 - 28      # an ICMP error and its quote fit in 576 bytes (RFC 1812 4.3.2.3)
_ICMPV6 = 58                # its types below 128 are errors (RFC 4443 2.1)
QUOTE_LIMIT6 = 1280 - 48    # an ICMPv6 error and its quote fit in IPv6's minimum MTU (RFC 4443 2.4)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unreachable(packet: bytes, source: bytes) -> bytes | None:
    """The "no such host" error answering an IP packet, from `source` (of
    the packet's family), or None where no error may be sent."""
    return host_unreachable(packet, source) if version(packet) == 4 else address_unreachable6(packet, source)


def address_unreachable6(packet: bytes, source: bytes) -> bytes | None:
    """An ICMPv6 "address unreachable" (type 1, code 3) from `source`
    answering an IPv6 packet, or None where no error may be sent (RFC 4443
    2.4): not IPv6, an ICMPv6 error (extension headers are not walked), an
    unspecified, loopback or multicast source, or a multicast destination."""
    if version(packet) != 6 or len(packet) < 40 or len(source) != 16:
        return None
    src, dst = packet[8:24], packet[24:40]
    if src[0] == 0xFF or dst[0] == 0xFF or src in (bytes(16), bytes(15) + b"\x01"):
        return None
    if packet[6] == _ICMPV6 and (len(packet) <= 40 or packet[40] < 128):
        return None
    message = bytes((1, 3, 0, 0, 0, 0, 0, 0)) + packet[:QUOTE_LIMIT6]
    pseudo = source + src + len(message).to_bytes(4, "big") + bytes(3) + bytes((_ICMPV6,))
    message = message[:2] + checksum(pseudo + message).to_bytes(2, "big") + message[4:]
    return (b"\x60\0\0\0" + len(message).to_bytes(2, "big") + bytes((_ICMPV6, 64)) + source + src + message)


def host_unreachable(packet: bytes, source: bytes) -> bytes | None:
    """An ICMP "host unreachable" from `source` answering an IPv4 packet, or
    None where no error may be sent (RFC 1122 3.2.2, RFC 1812 4.3.2.7): not
    IPv4, a later fragment, an ICMP error, or a source that is not one host
    (0/8, loopback, multicast, broadcast) or a multicast destination."""
    if version(packet) != 4 or len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    src, dst = packet[12:16], packet[16:20]
    if ihl < 20 or len(packet) < ihl or int.from_bytes(packet[6:8], "big") & 0x1FFF:
        return None
    if src[0] in (0, 127) or src[0] >= 224 or dst[0] >= 224:
        return None
    if packet[9] == _ICMP and (len(packet) <= ihl or packet[ihl] in _ICMP_ERRORS):
        return None
    message = bytes((3, 1, 0, 0, 0, 0, 0, 0)) + packet[:QUOTE_LIMIT]
    message = message[:2] + checksum(message).to_bytes(2, "big") + message[4:]
    header = bytearray(b"\x45\xc0" + (20 + len(message)).to_bytes(2, "big") + bytes(4)
                       + bytes((64, _ICMP)) + bytes(2) + source + src)
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + message
