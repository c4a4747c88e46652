"""The UDP socket (one per address family; IPv4 for now, SPEC §9 adds IPv6).

Batching (SPEC §9): consecutive datagrams of one batch to the same address
and of the same size leave in one sendmsg with UDP_SEGMENT (GSO: the kernel
cuts the buffer into datagrams), and UDP_GRO lets the kernel hand us such a
train as one buffer plus its segment size. Both fall back to one syscall per
datagram where the kernel or the device refuses them.
"""

from __future__ import annotations

import errno
import socket
import struct

RECV_SIZE = 65535
SOCKET_BUFFER = 4 << 20
UDP_SEGMENT = 103           # linux/udp.h
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64       # UDP_MAX_SEGMENTS in the kernel
GSO_MAX_BYTES = 65000       # a GSO send must fit one IP datagram's worth of payload
_U16 = struct.Struct("=H")
_CMSG_SPACE = socket.CMSG_SPACE(_U16.size * 2)


class UdpError(Exception):
    pass


def _from_v6(addr: tuple) -> tuple:
    host = addr[0]
    return (host[7:] if host.startswith("::ffff:") and "." in host else host, addr[1])


def _to_v6(addr: tuple) -> tuple:
    return (f"::ffff:{addr[0]}", addr[1]) if ":" not in addr[0] else addr


class Udp:
    def __init__(self, listen: str, port: int):
        family = socket.AF_INET6 if ":" in listen else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass
        try:
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
        self.send_errors = 0
        self.gso = True
        try:
            self.sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
            self.gro = True
        except OSError:
            self.gro = False

    def recv_batch(self, limit: int) -> list[tuple[bytes, tuple]]:
        batch = []
        recvmsg = self.sock.recvmsg
        try:
            for _ in range(limit):
                data, ancdata, _flags, addr = recvmsg(RECV_SIZE, _CMSG_SPACE)
                if self.v6:
                    addr = _from_v6(addr)
                size = 0
                for level, kind, value in ancdata:
                    if level == socket.IPPROTO_UDP and kind == UDP_GRO:
                        size = _U16.unpack_from(value)[0]
                if size and len(data) > size:
                    # a coalesced train: cut it back into the datagrams it was
                    batch.extend((data[i:i + size], addr) for i in range(0, len(data), size))
                else:
                    batch.append((data, addr))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass    # e.g. ECONNREFUSED from an earlier ICMP; nothing to read now
        return batch

    def send_batch(self, sends: list[tuple[bytes, tuple]]) -> None:
        """Send in order; runs of equal-size datagrams to one address go as one GSO send."""
        if self.v6:
            sends = [(d, _to_v6(a)) for d, a in sends]
        i, n = 0, len(sends)
        while i < n:
            data, addr = sends[i]
            size = len(data)
            j, total = i + 1, size
            if self.gso:
                while (j < n and j - i < GSO_MAX_SEGMENTS and sends[j][1] == addr
                       and total + len(sends[j][0]) <= GSO_MAX_BYTES):
                    nxt = len(sends[j][0])
                    if nxt > size:
                        break
                    total += nxt
                    j += 1
                    if nxt < size:      # only the last segment may be shorter
                        break
            if j - i > 1:
                self._send_gso([d for d, _ in sends[i:j]], size, addr)
            else:
                self._send_one(data, addr)
            i = j

    def _send_one(self, data: bytes, addr: tuple) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            # unreachable network, full buffer, ...: UDP is lossy anyway
            self.send_errors += 1

    def _send_gso(self, datagrams: list[bytes], size: int, addr: tuple) -> None:
        try:
            self.sock.sendmsg(datagrams, [(socket.IPPROTO_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                self.gso = False          # the device cannot segment: one by one from now on
            for data in datagrams:
                self._send_one(data, addr)

    def close(self) -> None:
        self.sock.close()
