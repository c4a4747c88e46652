"""A UDP socket of the underlay (one per address family: alpaca/host/underlay.py holds both).

Batching (docs/protocol.md §10): consecutive datagrams of one batch to the same address
and of the same size leave in one sendmsg with UDP_SEGMENT (GSO: the kernel
cuts the buffer into datagrams), and UDP_GRO lets the kernel hand us such a
train as one buffer plus its segment size. Both fall back to one syscall per
datagram where the kernel or the device refuses them. Both work the same
on IPv4 and IPv6 sockets.

Socket filter: while a garbage flood overflows the socket (the daemon
decides when, daemon.py), a classic BPF program (SO_ATTACH_FILTER) makes the
kernel accept every datagram from a known peer address and only a random
1/UNKNOWN_ONE_IN of the rest, so garbage from elsewhere is dropped before it
takes the socket buffer from tunnel traffic. The kernel counts what it drops
in the socket's drop counter (kernel_drops, `ss -m`: d) and in UDP InErrors.

Reply source (docs/operations.md, multi-homed servers): bound to the wildcard
address, the socket asks for IP_PKTINFO (IPv4) or IPV6_RECVPKTINFO (IPv6),
notes for each remote address the local address its datagrams arrived on,
remembers it (ReplySources) for the remotes the core authenticated
(`confirm`), and sends to that remote from that address (an IP_PKTINFO or
IPV6_PKTINFO control message on the sendmsg, GSO trains included), so a
peer that reaches a secondary address, through a NAT say, gets its answers
from that address and not from the one the kernel would choose. Bound to
one address nothing of this is done. The map holds local addresses as raw
bytes, 4 for IPv4 and 16 for IPv6; _source_cmsg turns one into the control
message.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct
from collections import OrderedDict
from collections.abc import Iterable

RECV_SIZE = 65535
SOCKET_BUFFER = 4 << 20
UDP_SEGMENT = 103           # linux/udp.h
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64       # UDP_MAX_SEGMENTS in the kernel
GSO_MAX_BYTES = 65000       # a GSO send must fit one IP datagram's worth of payload
_U16 = struct.Struct("=H")
IP_PKTINFO = 8              # linux/in.h (socket.IP_PKTINFO only from Python 3.12 on)
_PKTINFO_SIZE = 12          # struct in_pktinfo: ifindex, spec_dst (the local address), addr
_PKTINFO6_SIZE = 20         # struct in6_pktinfo: addr (the local address), ifindex
_MAPPED = bytes(10) + b"\xff\xff"     # ::ffff:a.b.c.d, an IPv4 address on a dual-stack socket
# room for a GRO segment size and both kinds of pktinfo (a dual-stack socket gets both for IPv4)
_CMSG_SPACE = (socket.CMSG_SPACE(_U16.size * 2) + socket.CMSG_SPACE(_PKTINFO_SIZE)
               + socket.CMSG_SPACE(_PKTINFO6_SIZE))
REPLY_SOURCES = 4096        # remote addresses ReplySources keeps, in each of its two tiers
# a send from a remembered local address that fails with one of these: the
# address is gone (ENETUNREACH, older kernels EINVAL) or unusable; send again
# without it (the kernel chooses) and forget it
_SOURCE_GONE = frozenset((errno.ENETUNREACH, errno.EINVAL, errno.EADDRNOTAVAIL, errno.EHOSTUNREACH))


# socket filters (linux/filter.h, asm-generic/socket.h)
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8
MAX_FILTER_ADDRESSES = 2000     # more known addresses than this: no filter (accept all)
UNKNOWN_ONE_IN = 16             # with the filter on, 1 in this many datagrams from elsewhere passes
BPF_MAXINSNS = 4096
_BPF_LD_W_ABS, _BPF_LD_B_ABS = 0x20, 0x30
_BPF_JA, _BPF_JEQ, _BPF_JGE, _BPF_RET = 0x05, 0x15, 0x35, 0x06
_SKF_NET_OFF = -0x100000        # loads relative to the IP header (a UDP socket's data starts at UDP)
_SKF_AD_RANDOM = -0x1000 + 56   # ancillary load: a random u32
_LEAF = 8                       # addresses compared one by one at the end of the binary search
_ACCEPT_ALL = 0xFFFFFFFF
_INSN = struct.Struct("=HBBI")  # struct sock_filter


class UdpError(Exception):
    pass


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:           # not an address
        return False


def filter_program(addresses: Iterable[str], unknown_one_in: int = UNKNOWN_ONE_IN,
                   v6_socket: bool = False) -> list[tuple[int, int, int, int]]:
    """A classic BPF program (code, jt, jf, k) that accepts every IPv4
    datagram whose source is one of `addresses` (a binary search over them),
    one in `unknown_one_in` of the others at random (0: none), and every IPv6
    one (v6_socket; an IPv6 socket carries IPv4 as mapped addresses, whose
    IP header is IPv4). Jump offsets are 8 bits, so the search branches
    with `ja`, whose offset is 32 bits."""
    keys = sorted({int.from_bytes(socket.inet_aton(host), "big") for host in addresses if _is_ipv4(host)})
    code: list = []          # instructions; a str k on a ja is a label resolved below
    labels: dict[str, int] = {}

    def search(lo: int, hi: int) -> None:
        if hi - lo <= _LEAF:
            for i in range(lo, hi):
                code.append((_BPF_JEQ, hi - i, 0, keys[i]))     # to the "ja accept" below
            code.extend([(_BPF_JA, 0, 0, "rest"), (_BPF_JA, 0, 0, "accept")])
            return
        mid = (lo + hi) // 2
        right = f"r{len(labels)}"
        labels[right] = -1
        code.extend([(_BPF_JGE, 0, 1, keys[mid]), (_BPF_JA, 0, 0, right)])
        search(lo, mid)
        labels[right] = len(code)
        search(mid, hi)

    if v6_socket:
        code.extend([(_BPF_LD_B_ABS, 0, 0, _SKF_NET_OFF), (_BPF_JGE, 0, 1, 0x60), (_BPF_JA, 0, 0, "accept")])
    code.append((_BPF_LD_W_ABS, 0, 0, _SKF_NET_OFF + 12))      # IPv4 source address
    search(0, len(keys))
    labels["rest"] = len(code)
    if unknown_one_in > 1:
        limit = (1 << 32) // unknown_one_in
        code.extend([(_BPF_LD_W_ABS, 0, 0, _SKF_AD_RANDOM), (_BPF_JGE, 0, 1, limit)])
    code.append((_BPF_RET, 0, 0, 0 if unknown_one_in != 1 else _ACCEPT_ALL))
    labels["accept"] = len(code)
    code.append((_BPF_RET, 0, 0, _ACCEPT_ALL))
    program = [(op, jt, jf, labels[k] - i - 1 if isinstance(k, str) else k & 0xFFFFFFFF)
               for i, (op, jt, jf, k) in enumerate(code)]
    if len(program) > BPF_MAXINSNS:
        raise ValueError(f"{len(keys)} addresses need {len(program)} BPF instructions")
    return program


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER: replaces the socket's filter, if any, at once."""
    insns = ctypes.create_string_buffer(b"".join(_INSN.pack(*insn) for insn in program))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(insns))   # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _from_v6(addr: tuple) -> tuple:
    host = addr[0]
    return (host[7:] if host.startswith("::ffff:") and "." in host else host, addr[1])


def _to_v6(addr: tuple) -> tuple:
    return (f"::ffff:{addr[0]}", addr[1]) if ":" not in addr[0] else addr


class ReplySources:
    """Remote (host, port) -> the local address (raw bytes) its datagrams last
    arrived on, for the replies to leave from. Two tiers, each bounded by
    `limit`: `heard` takes every arrival from a remote we have not sent to
    (garbage from spoofed addresses churns through it, oldest out first), and
    a remote moves to `used` on the first send to it, where the least
    recently sent-to goes first; so a flood from many addresses does not push
    out the peers we answer."""

    __slots__ = ("limit", "heard", "used")

    def __init__(self, limit: int = REPLY_SOURCES):
        self.limit = limit
        self.heard: OrderedDict[tuple, bytes] = OrderedDict()
        self.used: OrderedDict[tuple, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self.heard) + len(self.used)

    def arrived(self, remote: tuple, local: bytes) -> None:
        """A datagram from `remote` arrived on `local`."""
        if remote in self.used:
            self.used[remote] = local
            return
        heard = self.heard
        heard[remote] = local
        if len(heard) > self.limit:
            heard.popitem(last=False)

    def source(self, remote: tuple) -> bytes | None:
        """The local address to send to `remote` from; None: unknown (the kernel chooses)."""
        used = self.used
        local = used.get(remote)
        if local is not None:
            used.move_to_end(remote)
            return local
        local = self.heard.pop(remote, None)
        if local is not None:
            used[remote] = local
            if len(used) > self.limit:
                used.popitem(last=False)
        return local

    def get(self, remote: tuple) -> bytes | None:
        """What source() would answer, without counting it as a send."""
        local = self.used.get(remote)
        return local if local is not None else self.heard.get(remote)

    def forget(self, remote: tuple) -> None:
        self.used.pop(remote, None)
        self.heard.pop(remote, None)


def _source_cmsg(local: bytes) -> tuple[int, int, bytes]:
    """The control message that makes a send leave from `local` (any output
    interface: the route to the remote from that source decides)."""
    if len(local) == 4:
        return (socket.IPPROTO_IP, IP_PKTINFO, bytes(4) + local + bytes(4))
    return (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, local + bytes(4))   # struct in6_pktinfo


def _pktinfo_local(level: int, kind: int, value: bytes) -> bytes | None:
    """The local address a pktinfo control message names (the address to
    answer from), as 4 or 16 raw bytes; an IPv4 one on a dual-stack socket
    as 4. None for any other control message."""
    if kind == IP_PKTINFO and level == socket.IPPROTO_IP:
        return value[4:8]               # ipi_spec_dst
    if kind == socket.IPV6_PKTINFO and level == socket.IPPROTO_IPV6:
        local = value[:16]              # ipi6_addr
        return local[12:] if local[:12] == _MAPPED else local
    return None


def local_text(local: bytes | None) -> str | None:
    """A remembered local address as text (status)."""
    if local is None:
        return None
    return socket.inet_ntop(socket.AF_INET if len(local) == 4 else socket.AF_INET6, local)


class Udp:
    def __init__(self, listen: str, port: int, v6only: bool = False):
        """A socket bound to listen:port. An IPv6 one carries IPv4 too (as
        mapped addresses) unless `v6only` (IPV6_V6ONLY: the daemon's, beside
        an IPv4 socket of its own). Raises UdpError when it cannot be made."""
        family = socket.AF_INET6 if ":" in listen else socket.AF_INET
        try:
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as e:            # e.g. a kernel without IPv6
            raise UdpError(f"cannot open a UDP socket for {listen}: {e.strerror or e}") from None
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass
        try:
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            self.sock.bind((listen, port))
        except OSError as e:
            self.sock.close()
            why = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise UdpError(f"cannot listen on UDP {listen}:{port}: {why}") from None
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        # an IPv6 socket ("::") also carries IPv4 as ::ffff:a.b.c.d; the core
        # compares addresses as plain (host, port) pairs, so translate here
        self.v6 = family == socket.AF_INET6
        self.mapped = self.v6 and not v6only      # IPv4 arrives as ::ffff:a.b.c.d and must leave so
        self.send_errors = 0
        self.filtered: int | None = None        # known addresses in the socket filter, None: no filter
        self.gso = True
        try:
            self.sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
            self.gro = True
        except OSError:
            self.gro = False
        # on the wildcard address: answer each remote from the address it sent to
        self.sources: ReplySources | None = None
        self.arrivals: dict[tuple, bytes] = {}  # remote -> local address, from the last recv_batch
        self.stale_sources = 0          # sends whose remembered source address was gone
        if ipaddress.ip_address(listen).is_unspecified:
            try:
                if self.v6:
                    self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                if not v6only:          # IPv4, or IPv4 on a dual-stack socket
                    self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                self.sources = ReplySources()
            except OSError:
                pass

    def reply_source(self, remote: tuple) -> str | None:
        """The local address replies to `remote` leave from, if remembered (status)."""
        return local_text(self.sources.get(remote)) if self.sources is not None else None

    # ------------------------------------------------------------ socket filter
    def filter_known(self, addresses: set[str] | None, unknown_one_in: int = UNKNOWN_ONE_IN) -> bool:
        """Let the kernel accept only `addresses` and one in unknown_one_in of
        the rest; None (or more than MAX_FILTER_ADDRESSES): accept all.
        True when a filter is attached."""
        if addresses is not None and len(addresses) <= MAX_FILTER_ADDRESSES:
            attach_filter(self.sock, filter_program(addresses, unknown_one_in, self.v6))
            self.filtered = len(addresses)
            return True
        if self.filtered is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
            self.filtered = None
        return False

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped for this socket (buffer full, or the
        filter); None where SO_MEMINFO is missing."""
        try:
            info = self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
        except OSError:
            return None
        if len(info) < 4 * (SK_MEMINFO_DROPS + 1):
            return None
        return struct.unpack_from("=I", info, 4 * SK_MEMINFO_DROPS)[0]

    def recv_batch(self, limit: int, budget: int = 1 << 30) -> list[tuple[bytes, tuple]]:
        """Up to `limit` reads (a GRO train is one), fewer once `budget`
        bytes are read (a wake-up's work stays short: docs/design.md),
        unless the last read was a train cut inside a message (until past twice
        the budget then: below).
        The local address each arrived on is only noted (`arrivals`): what
        a datagram's sender says is hostile until the core has
        authenticated it, so it is remembered for replies by `confirm`,
        for the senders the core vouches for."""
        batch = []
        recvmsg = self.sock.recvmsg
        sources = self.sources
        used = sources.used if sources is not None else None
        arrivals = self.arrivals
        arrivals.clear()
        total = 0
        try:
            for _ in range(limit):
                data, ancdata, _flags, addr = recvmsg(RECV_SIZE, _CMSG_SPACE)
                total += len(data)
                if self.v6:
                    addr = _from_v6(addr) if self.mapped else addr[:2]
                size = 0
                for level, kind, value in ancdata:
                    if level == socket.IPPROTO_UDP and kind == UDP_GRO:
                        size = _U16.unpack_from(value)[0]
                    elif used is not None:
                        local = _pktinfo_local(level, kind, value)
                        if local is not None and used.get(addr) != local:
                            arrivals[addr] = local
                if size and len(data) > size:
                    # a coalesced train: cut it back into the datagrams it was
                    # (views, not copies: a shard is copied once, when its message is joined)
                    view = memoryview(data)
                    batch.extend((view[i:i + size], addr) for i in range(0, len(data), size))
                else:
                    batch.append((data, addr))
                # a GRO train that ends with a full-size datagram was most
                # likely cut inside a message (its last data shard is the
                # short one): one more read brings the rest, and its shards
                # can be taken as one whole train (docs/protocol.md §12)
                if total >= budget and not (size and len(data) > size and not len(data) % size
                                            and total < 2 * budget):
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass    # e.g. ECONNREFUSED from an earlier ICMP; nothing to read now
        return batch

    def confirm(self, heard: Iterable[tuple]) -> None:
        """The remotes of the last recv_batch that the core authenticated
        (Output.heard): answer them from the address they sent to."""
        arrivals, sources = self.arrivals, self.sources
        if arrivals and sources is not None:
            for remote in heard:
                local = arrivals.get(remote)
                if local is not None:
                    sources.arrived(remote, local)

    def send_batch(self, sends: list[tuple[bytes, tuple]]) -> None:
        """Send in order; runs of equal-size datagrams to one address go as one GSO send."""
        sources = self.sources
        remotes = sends                 # the core's (host, port) pairs: the keys of `sources`
        if self.mapped:
            sends = [(d, _to_v6(a)) for d, a in sends]
        i, n = 0, len(sends)
        while i < n:
            data, addr = sends[i]
            src = sources.source(remotes[i][1]) if sources is not None else None
            size = len(data)
            j = i + 1
            if self.gso and size:
                # a run of equal sizes (a message's shards), then perhaps one
                # shorter: only the last segment may be
                end = min(n, i + GSO_MAX_SEGMENTS, i + GSO_MAX_BYTES // size)
                while j < end and sends[j][1] == addr and len(sends[j][0]) == size:
                    j += 1
                if (j < n and j - i < GSO_MAX_SEGMENTS and sends[j][1] == addr and len(sends[j][0]) < size
                        and (j - i) * size + len(sends[j][0]) <= GSO_MAX_BYTES):
                    j += 1
            if j - i > 1:
                self._send_gso([d for d, _ in sends[i:j]], size, addr, src)
            else:
                self._send_one(data, addr, src)
            i = j

    def _source_gone(self, addr: tuple) -> None:
        """Sending from the remembered address failed: forget it, the kernel chooses."""
        self.stale_sources += 1
        self.sources.forget(_from_v6(addr) if self.v6 else addr)

    def _send_one(self, data: bytes, addr: tuple, src: bytes | None = None) -> None:
        try:
            if src is None:
                self.sock.sendto(data, addr)
            else:
                self.sock.sendmsg([data], [_source_cmsg(src)], 0, addr)
        except OSError as e:
            if src is not None and e.errno in _SOURCE_GONE:
                self._source_gone(addr)
                self._send_one(data, addr)
                return
            # unreachable network, full buffer, ...: UDP is lossy anyway
            self.send_errors += 1

    def _send_gso(self, datagrams: list[bytes], size: int, addr: tuple, src: bytes | None = None) -> None:
        cmsgs = [(socket.IPPROTO_UDP, UDP_SEGMENT, _U16.pack(size))]
        if src is not None:
            cmsgs.append(_source_cmsg(src))
        try:
            self.sock.sendmsg(datagrams, cmsgs, 0, addr)
        except OSError as e:
            if src is not None and e.errno in _SOURCE_GONE:
                # the source address first (EINVAL could be either): if GSO is
                # what the kernel refuses, the send without it says so
                self._source_gone(addr)
                self._send_gso(datagrams, size, addr)
                return
            if e.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                self.gso = False          # the device cannot segment: one by one from now on
            for data in datagrams:
                self._send_one(data, addr, src)

    def close(self) -> None:
        self.sock.close()
