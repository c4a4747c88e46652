"""The UDP socket (one per address family; IPv4 for now, SPEC §9 adds IPv6)."""

from __future__ import annotations

import errno
import socket

RECV_SIZE = 65535
SOCKET_BUFFER = 4 << 20


class UdpError(Exception):
    pass


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
        self.send_errors = 0

    def recv_batch(self, limit: int) -> list[tuple[bytes, tuple]]:
        batch = []
        recv = self.sock.recvfrom
        try:
            for _ in range(limit):
                batch.append(recv(RECV_SIZE))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass    # e.g. ECONNREFUSED from an earlier ICMP; nothing to read now
        return batch

    def send_batch(self, sends: list[tuple[bytes, tuple]]) -> None:
        sendto = self.sock.sendto
        for data, addr in sends:
            try:
                sendto(data, addr)
            except OSError:
                # unreachable network, full buffer, ...: UDP is lossy anyway
                self.send_errors += 1

    def close(self) -> None:
        self.sock.close()
