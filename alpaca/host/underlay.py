"""The underlay: one UDP socket per address family (docs/operations.md "IPv6 underlay").

On the wildcard address (`listen` "0.0.0.0" or "::", the default) the
daemon listens on both families at the same port: an AF_INET socket and an
AF_INET6 one with IPV6_V6ONLY, so each family keeps its own socket options
(GSO/GRO, IP_PKTINFO or IPV6_PKTINFO reply sources, the flood filter) and
IPv4 addresses reach the core as plain dotted quads without a mapping step.
A host without IPv6 (the socket cannot be made or bound) runs on IPv4
alone; `problem` says why, for one log line. On one configured address
only that address's family is used.

The core hands over (datagram, (host, port)) pairs of either family; each
goes out on the socket of its family, in order within the family.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from .udp import Udp, UdpError


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def planned_sockets(listen: str, port: int) -> str:
    """What Underlay(listen, port) opens, in words (`alpaca-tunnel check`)."""
    if not ipaddress.ip_address(listen).is_unspecified:
        family = "IPv6" if ":" in listen else "IPv4"
        return f"UDP socket on {endpoint_text(listen, port)} ({family} only)"
    return (f"UDP sockets on 0.0.0.0:{port} (IPv4) and [::]:{port} (IPv6, IPV6_V6ONLY; "
            "IPv4 alone on a host without IPv6)")


class Underlay:
    """The daemon's UDP sockets (one or two), used as one."""

    def __init__(self, listen: str, port: int, socket_factory=Udp):
        self.problem: str | None = None          # why there is no IPv6 socket on the wildcard address
        self.socks: dict[int, Udp] = {}          # address family -> its socket
        if not ipaddress.ip_address(listen).is_unspecified:
            self.socks[family_of(listen)] = socket_factory(listen, port, v6only=True)
        else:
            v4 = self.socks[socket.AF_INET] = socket_factory("0.0.0.0", port)
            port = port or v4.sock.getsockname()[1]     # (port 0, tests: both on the port v4 got)
            try:
                self.socks[socket.AF_INET6] = socket_factory("::", port, v6only=True)
            except UdpError as e:
                self.problem = f"no IPv6 underlay ({e}); peers are reached over IPv4 only"
        self._by_fd = {s.fd: s for s in self.socks.values()}
        self._last: Udp | None = None            # the socket of the last recv_batch

    @property
    def fds(self) -> list[int]:
        return list(self._by_fd)

    def endpoints(self) -> list[str]:
        """Where it listens, e.g. ["0.0.0.0:1040", "[::]:1040"]."""
        return [endpoint_text(*s.sock.getsockname()[:2]) for s in self.socks.values()]

    def recv_batch(self, limit: int, fd: int, budget: int = 1 << 30) -> list[tuple[bytes, tuple]]:
        """Datagrams from the socket `fd` (Udp.recv_batch)."""
        self._last = self._by_fd[fd]
        return self._last.recv_batch(limit, budget)

    def confirm(self, heard: Iterable[tuple]) -> None:
        """The remotes of the last recv_batch the core authenticated (Udp.confirm)."""
        if self._last is not None:
            self._last.confirm(heard)

    def send_batch(self, sends: list[tuple[bytes, tuple]]) -> None:
        """Each datagram on the socket of its address's family, in order
        within the family; one to a family without a socket is not sent."""
        v4, v6 = [], []
        last = into = None
        for send in sends:
            if send[1] is not last:         # (a message's shards share one address object)
                last = send[1]
                into = v6 if ":" in last[0] else v4
            into.append(send)
        for family, batch in ((socket.AF_INET, v4), (socket.AF_INET6, v6)):
            sock = self.socks.get(family)
            if batch and sock is not None:
                sock.send_batch(batch)

    def reply_source(self, remote: tuple) -> str | None:
        sock = self.socks.get(family_of(remote[0]))
        return sock.reply_source(remote) if sock is not None else None

    # ------------------------------------------------------------ counters, socket filter
    @property
    def send_errors(self) -> int:
        return sum(s.send_errors for s in self.socks.values())

    @property
    def stale_sources(self) -> int:
        return sum(s.stale_sources for s in self.socks.values())

    @property
    def filtered(self) -> int | None:
        sock = self.socks.get(socket.AF_INET)
        return sock.filtered if sock is not None else None

    def kernel_drops(self) -> int | None:
        counts = [s.kernel_drops() for s in self.socks.values()]
        return None if any(c is None for c in counts) else sum(counts)

    def filter_known(self, addresses: set[str] | None, **kw) -> bool:
        """Udp.filter_known on the IPv4 socket, with the known IPv4
        addresses. The IPv6 socket gets no filter: the program compares
        IPv4 sources only, so it would let every IPv6 datagram through anyway."""
        sock = self.socks.get(socket.AF_INET)
        if sock is None:
            return False
        return sock.filter_known(None if addresses is None else {a for a in addresses if ":" not in a}, **kw)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
