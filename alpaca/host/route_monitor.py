"""Netlink events that may change our routes or a route lookup, for the daemon's selector."""

from __future__ import annotations

import errno
import select
import socket

from pyroute2 import IPRSocket
from pyroute2.netlink import rtnl

from .routes import ALPACA_RTPROTO, OWN_PORTIDS, RT_TABLE_LOCAL, SO_RCVBUFFORCE


class RouteMonitor:
    """A pyroute2 IPRSocket subscribed to IPv4 (and with `ipv6` IPv6) route, rule and address changes, for
    the daemon's selector.
    drain() reads everything pending without blocking and says whether anything happened that may change
    our routes or a route lookup. Changes made by ClientRoutes' sockets are ignored; a receive-buffer
    overrun counts as a change."""

    def __init__(self, ipv6: bool = False) -> None:
        self._families = (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)
        self._sock = IPRSocket()
        try:
            try:       # room for a burst (a flushed chnroute table); past net.core.rmem_max with CAP_NET_ADMIN
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            except OSError:
                pass
            groups = rtnl.RTMGRP_IPV4_ROUTE | rtnl.RTMGRP_IPV4_RULE | rtnl.RTMGRP_IPV4_IFADDR
            if ipv6:
                groups |= rtnl.RTMGRP_IPV6_ROUTE | rtnl.RTMGRP_IPV6_RULE | rtnl.RTMGRP_IPV6_IFADDR
            self._sock.bind(groups=groups)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def drain(self) -> bool:
        relevant = False
        while select.select([self._sock], [], [], 0)[0]:
            try:
                relevant = any(self._relevant(m) for m in self._sock.get()) or relevant
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                relevant = True          # we missed events: assume the worst
        return relevant

    def _relevant(self, msg) -> bool:
        kind = msg["header"]["type"]
        if msg["header"]["pid"] in OWN_PORTIDS or msg.get("family") not in self._families:
            return False
        if kind in (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE):      # a new route of ours (another socket): no loss
            return msg.get("table") != RT_TABLE_LOCAL and not (
                kind == rtnl.RTM_NEWROUTE and msg["proto"] == ALPACA_RTPROTO)
        if kind in (rtnl.RTM_NEWRULE, rtnl.RTM_DELRULE):
            return not (kind == rtnl.RTM_NEWRULE and msg.get("protocol") == ALPACA_RTPROTO)
        return kind in (rtnl.RTM_NEWADDR, rtnl.RTM_DELADDR)
