"""The kernel's routing decision for a destination outside the tunnel net:
which peer's tunnel address is the next hop (docs/protocol.md §6). The
core keeps the answers (Node.next_hops) and asks again after a route
change; this module is the question, one netlink round trip to the local
kernel."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute

from .routes import NL_ERRORS, ifindex, route_of


class RouteLookup:
    """Ask the kernel which route a packet to dst takes (an output lookup
    without fwmark, as the packets that end up in the TUN see it) and
    answer its next hop when that route goes out through our TUN."""

    def __init__(self, tun_name: str):
        self.tun_name = tun_name
        self._tun: int | None = None
        self._ipr: IPRoute | None = None
        self.lookups = 0

    def next_hop(self, dst_packed: bytes) -> str | None:
        """The gateway of the route to dst when it leaves through our TUN, else None."""
        self.lookups += 1
        self._tun = self._tun or ifindex(self.tun_name)
        if self._tun is None or len(dst_packed) not in (4, 16):
            return None
        try:
            self._ipr = self._ipr or IPRoute()
            found = self._ipr.route("get", dst=str(ipaddress.ip_address(dst_packed)))
        except NL_ERRORS:
            return None      # unreachable, or netlink trouble: the core falls back to its gateway
        route = route_of(found[0]) if found else None
        return route.gateway if route is not None and route.oif == self._tun else None

    def invalidate(self) -> None:
        """Routes or links changed: find the TUN's index again."""
        self._tun = None

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
