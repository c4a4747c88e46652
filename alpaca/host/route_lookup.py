"""The kernel's routing decision for a destination outside the tunnel net,
cached: which peer's tunnel address is the next hop (docs/protocol.md §6)."""

from __future__ import annotations

import socket

from pyroute2 import IPRoute

from .routes import LOOKUP_CACHE_SIZE, NL_ERRORS, ifindex, route_of


class RouteLookup:
    """dst_id for destinations outside the tunnel net (docs/protocol.md §6): ask the kernel which route a packet
    to dst takes (an output lookup without fwmark, as the packets that end up in the TUN see it)
    and answer its next hop when that route goes out through our TUN. Cached until invalidate()."""

    def __init__(self, tun_name: str, max_entries: int = LOOKUP_CACHE_SIZE):
        self.tun_name = tun_name
        self.max_entries = max_entries
        self._cache: dict[bytes, str | None] = {}
        self._tun: int | None = None
        self._ipr: IPRoute | None = None
        self.lookups = 0

    def gateway_for(self, dst_packed: bytes) -> str | None:
        if dst_packed in self._cache:
            return self._cache[dst_packed]
        answer = self._lookup(dst_packed)
        if len(self._cache) >= self.max_entries:
            del self._cache[next(iter(self._cache))]     # oldest first
        self._cache[dst_packed] = answer
        return answer

    def _lookup(self, dst_packed: bytes) -> str | None:
        self.lookups += 1
        self._tun = self._tun or ifindex(self.tun_name)
        if self._tun is None:
            return None
        try:
            self._ipr = self._ipr or IPRoute()
            found = self._ipr.route("get", dst=socket.inet_ntoa(dst_packed))
        except NL_ERRORS:
            return None      # unreachable, or netlink trouble: the daemon falls back to its gateway
        route = route_of(found[0]) if found else None
        return route.gateway if route is not None and route.oif == self._tun else None

    def invalidate(self) -> None:
        self._cache.clear()
        self._tun = None

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
