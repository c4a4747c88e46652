"""UDP super-packets made and cut in software (docs/protocol.md §12).

Cutting: a peer whose TUN has USO (TUN_F_USO4/6, Linux >= 6.2) sends a UDP
super-packet whole: one virtio_net_hdr with gso_type UDP_L4 and the
datagrams of one socket write (UDP_SEGMENT) behind one IP and UDP header.
A kernel without USO refuses such a write, so the TUN cuts it here into the
datagrams the sender wrote: each with its own IP header (length, IPv4 ID
counting up and header checksum, as the kernel's own segmentation makes
them), UDP length and a complete UDP checksum, behind an all-zero
virtio_net_hdr.

Joining (coalesce_udp, below): the datagrams of one flow that a batch of
TUN reads returns become one such super-packet, as UDP GRO would make it.
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


def _sum(data: bytes | memoryview) -> int:
    n = int.from_bytes(data, "big")
    return _fold(n << 8 if len(data) % 2 else n)    # (an odd last byte is the high half of a word)


def _ipv4_checksum(header: bytes | bytearray) -> int:
    return 0xFFFF - _sum(bytes(header))


MAX_CUT_SEGMENTS = 128      # UDP_MAX_SEGMENTS of today's kernels: no sender makes more


def segment_udp(packet: bytes) -> list[bytes] | None:
    """The datagrams of a UDP super-packet (virtio_net_hdr + IP + UDP +
    payload), each a TUN write with a zero virtio_net_hdr; None when it is
    not one we can cut (not IPv4/IPv6 + UDP, IPv6 extension headers, a
    gso_size of 0 or one that makes more than MAX_CUT_SEGMENTS datagrams,
    an IPv4 fragment)."""
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
    if len(ip) < ihl + _UDP_HEADER or -(-(len(ip) - ihl - _UDP_HEADER) // gso_size) > MAX_CUT_SEGMENTS:
        return None     # (a peer's tiny gso_size must not make one message thousands of writes)
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


# ---------------------------------------------------------------- coalescing
#
# The other way: datagrams of one flow read from the TUN one by one (a UDP
# sender without UDP_SEGMENT, such as most QUIC stacks) are joined into one
# UDP super-packet, as the kernel's UDP GRO joins them on a NIC, so they
# travel as one message (one AEAD, no per-datagram work at either end).

MAX_SEGMENTS = 64            # UDP_MAX_SEGMENTS of older kernels: a receiving TUN refuses more
MAX_IP_PACKET = 65535        # an IPv4 total length (and what a message carries, docs/protocol.md §12)
_NEEDS_CSUM = 1              # virtio_net_hdr flag: the checksum is left to the receiver


def _flow(p: bytes) -> tuple[bytes, int] | None:
    """(what the datagrams of one flow share, header bytes up to the UDP
    payload) of a TUN read that may join a UDP super-packet, else None: a
    plain or checksum-partial UDP datagram, IPv4 without options or
    fragmentation, or IPv6 without extension headers, its lengths agreeing
    with its size, and a checksum that is either left to the receiver or
    complete and correct (a datagram whose checksum fails stays as it is)."""
    flags = p[0] if len(p) >= 38 else 2
    if flags > _NEEDS_CSUM or p[1]:
        return None
    if p[10] == 0x45:
        if p[19] != _UDP or p[16] & 0x3F or p[17] or int.from_bytes(p[12:14], "big") != len(p) - 10:
            return None
        key, hdr = p[10:12] + p[16:20] + p[22:34], 38
    elif p[10] >> 4 == 6 and len(p) >= 58 and p[16] == _UDP:
        if int.from_bytes(p[14:16], "big") != len(p) - 50:
            return None
        key, hdr = p[10:14] + p[16:18] + p[18:54], 58
    else:
        return None
    if len(p) == hdr or int.from_bytes(p[hdr - 4:hdr - 2], "big") != len(p) - hdr + _UDP_HEADER:
        return None         # (an empty datagram cannot set a gso_size)
    if flags:
        if int.from_bytes(p[6:8], "little") != hdr - 18 or int.from_bytes(p[8:10], "little") != 6:
            return None
    elif p[hdr - 2:hdr] == b"\0\0" or not _udp_checksum_ok(p, hdr):
        return None
    return key, hdr


def _udp_checksum_ok(p: bytes, hdr: int) -> bool:
    length = (len(p) - hdr + _UDP_HEADER).to_bytes(2, "big")
    addresses = p[22:30] if hdr == 38 else p[18:50]
    return _fold(_sum(addresses + bytes((0, _UDP)) + length) + _sum(memoryview(p)[hdr - 8:])) == 0xFFFF


def _joined(first: bytes, hdr: int, payloads: list[bytes]) -> bytes:
    """The UDP super-packet of a run: the first datagram's headers, lengths
    for the whole, the IPv4 ID of the first (the receiving kernel counts it
    up per datagram) and the UDP checksum left partial (pseudo header only)."""
    data = b"".join(payloads)
    udp_len = (_UDP_HEADER + len(data)).to_bytes(2, "big")
    ip = bytearray(first[10:hdr - 8])
    if hdr == 38:
        ip[2:4] = (20 + 8 + len(data)).to_bytes(2, "big")
        ip[10:12] = b"\0\0"
        ip[10:12] = _ipv4_checksum(ip).to_bytes(2, "big")
        pseudo = _sum(bytes(ip[12:20]) + bytes((0, _UDP)) + udp_len)
    else:
        ip[4:6] = udp_len
        pseudo = _sum(bytes(ip[8:40]) + bytes((0, _UDP)) + udp_len)
    l3 = hdr - 18
    vnet = (bytes((_NEEDS_CSUM, GSO_UDP_L4)) + (hdr - 10).to_bytes(2, "little")
            + len(payloads[0]).to_bytes(2, "little") + l3.to_bytes(2, "little") + (6).to_bytes(2, "little"))
    return vnet + bytes(ip) + first[hdr - 8:hdr - 4] + udp_len + pseudo.to_bytes(2, "big") + data


class _Run:
    __slots__ = ("first", "hdr", "size", "payloads", "total", "closed")

    def __init__(self, first: bytes, hdr: int):
        self.first, self.hdr = first, hdr
        self.size = len(first) - hdr
        self.payloads = [first[hdr:]]
        self.total = len(first)
        self.closed = False

    def take(self, packet: bytes) -> bool:
        """Add the next datagram of the flow if the run can hold it: same
        size, or one shorter that ends the run."""
        size = len(packet) - self.hdr
        if (self.closed or size > self.size or len(self.payloads) >= MAX_SEGMENTS
                or self.total + size > MAX_IP_PACKET + 10):
            return False
        self.payloads.append(packet[self.hdr:])
        self.total += size
        self.closed = size < self.size
        return True

    def packet(self) -> bytes:
        return self.first if len(self.payloads) == 1 else _joined(self.first, self.hdr, self.payloads)


def coalesce_udp(packets: list[bytes]) -> list[bytes]:
    """TUN reads with the UDP datagrams of each flow joined into super-packets
    (consecutive ones of a flow; flows keep their own order, not their order
    among each other, as with GRO). Everything else is left as it was read."""
    out: list = []
    runs: dict[bytes, _Run] = {}
    for packet in packets:
        flow = _flow(packet)
        if flow is None:
            out.append(packet)
            continue
        run = runs.get(flow[0])
        if run is None or not run.take(packet):
            run = runs[flow[0]] = _Run(packet, flow[1])
            out.append(run)
    if not runs:
        return packets
    return [p.packet() if isinstance(p, _Run) else p for p in out]
