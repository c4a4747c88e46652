"""UDP super-packets cut into datagrams in software (docs/protocol.md §12).

A peer whose TUN has USO (TUN_F_USO4/6, Linux >= 6.2) sends a UDP
super-packet whole: one virtio_net_hdr with gso_type UDP_L4 and the
datagrams of one socket write (UDP_SEGMENT) behind one IP and UDP header.
A kernel without USO refuses such a write, so the TUN cuts it here into the
datagrams the sender wrote: each with its own IP header (length, IPv4 ID
counting up and header checksum, as the kernel's own segmentation makes
them), UDP length and a complete UDP checksum, behind an all-zero
virtio_net_hdr.
"""

from __future__ import annotations

VNET_HDR_SIZE = 10
GSO_UDP_L4 = 5               # virtio_net_hdr gso_type (linux/virtio_net.h)
GSO_ECN = 0x80               # ... a flag besides the type
_ZERO_VNET = bytes(VNET_HDR_SIZE)
_UDP = 17
_UDP_HEADER = 8


def is_udp_gso(packet: bytes) -> bool:
    """A TUN write (virtio_net_hdr first) carrying a UDP super-packet."""
    return len(packet) > VNET_HDR_SIZE and packet[1] & ~GSO_ECN == GSO_UDP_L4


def _fold(total: int) -> int:
    """The ones' complement sum of a big-endian number's 16-bit words: as
    2**16 is 1 modulo 0xFFFF, one modulo does what the word loop does."""
    s = total % 0xFFFF
    return s if s or not total else 0xFFFF


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return _fold(int.from_bytes(data, "big"))


def _ipv4_checksum(header: bytes | bytearray) -> int:
    return 0xFFFF - _sum(bytes(header))


def segment_udp(packet: bytes) -> list[bytes] | None:
    """The datagrams of a UDP super-packet (virtio_net_hdr + IP + UDP +
    payload), each a TUN write with a zero virtio_net_hdr; None when it is
    not one we can cut (not IPv4/IPv6 + UDP, IPv6 extension headers, a
    gso_size of 0, an IPv4 fragment)."""
    gso_size = int.from_bytes(packet[4:6], "little")
    ip = packet[VNET_HDR_SIZE:]
    if not gso_size or not ip:
        return None
    v = ip[0] >> 4
    if v == 4 and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        if ihl < 20 or ip[9] != _UDP or int.from_bytes(ip[6:8], "big") & 0x3FFF:
            return None
        pseudo = _sum(ip[12:20] + bytes((0, _UDP)))
    elif v == 6 and len(ip) >= 40:
        ihl = 40
        if ip[6] != _UDP:
            return None
        pseudo = _sum(ip[8:40] + bytes((0, _UDP)))
    else:
        return None
    if len(ip) < ihl + _UDP_HEADER:
        return None
    ports = ip[ihl:ihl + 4]
    payload = memoryview(ip)[ihl + _UDP_HEADER:]
    first_id = int.from_bytes(ip[4:6], "big") if v == 4 else 0
    out = []
    for n, at in enumerate(range(0, max(len(payload), 1), gso_size)):
        data = bytes(payload[at:at + gso_size])
        udp_len = (_UDP_HEADER + len(data)).to_bytes(2, "big")
        # pseudo header (addresses, protocol, UDP length) + UDP header + data
        check = 0xFFFF - _fold(pseudo + _sum(ports + udp_len + udp_len + data)) or 0xFFFF
        udp = ports + udp_len + check.to_bytes(2, "big")
        if v == 4:
            header = bytearray(ip[:ihl])
            header[2:4] = (ihl + _UDP_HEADER + len(data)).to_bytes(2, "big")
            header[4:6] = ((first_id + n) & 0xFFFF).to_bytes(2, "big")
            header[10:12] = b"\0\0"
            header[10:12] = _ipv4_checksum(header).to_bytes(2, "big")
        else:
            header = bytearray(ip[:40])
            header[4:6] = (_UDP_HEADER + len(data)).to_bytes(2, "big")
        out.append(_ZERO_VNET + bytes(header) + udp + data)
    return out
