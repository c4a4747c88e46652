"""Client routing (docs/operations.md "Client routing"): the default route into the tunnel, the underlay kept outside it.

Design and values: docs/operations.md, "Client routing". In short (P = PRIORITY, every rule and route tagged proto 97):

    P-2: from all lookup main suppress_prefixlength 0
    P-1: from all lookup <chnroute.table> suppress_prefixlength 0     (only with chnroute)
    P:   not from all fwmark FWMARK lookup TABLE
    TABLE: default via <gateway's tunnel address> dev <tun>
    TABLE: unreachable default metric KILL_SWITCH_METRIC            (only with the kill switch)
    main: <servers, forwarders, local_routes> via <original gateway>   (metric ALPACA_METRIC)
    <chnroute.table>: <chnroute prefixes> via <chnroute.gateway>   ("original": via the original gateway)

The same again in the IPv6 family (same priorities, table, fwmark, metric, tag) when the tunnel carries IPv6
(gateway6) or IPv6 outside it is to be blocked (block_ipv6: TABLE holds only an unreachable default then).
Each family's underlay, local_routes and chnroute entries go via that family's original gateway.

All netlink goes through pyroute2: IPRoute for changes, dumps and lookups, IPRSocket for the monitor.
Deletes name the tag, so the kernel never deletes an untagged twin of one of ours.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import time
from collections import namedtuple
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alpaca.config import CHN_ORIGINAL

from .chnroute import ChnrouteData, plural, read_chnroute

from pyroute2 import IPRoute
from pyroute2.netlink import rtnl
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rt_files import RtTablesFile

if TYPE_CHECKING:
    from alpaca.config import ChnRoute

log = logging.getLogger(__name__)

ALPACA_RTPROTO = 0x61        # 97: route/rule "proto" tag; not assigned in /etc/iproute2/rt_protos
ALPACA_METRIC = 0x414C       # 16716: metric of every route we add (never clobbers a metric-0 route)
KILL_SWITCH_METRIC = ALPACA_METRIC + 1   # worse than the tunnel's default: used only once that one is gone
FWMARK = 0x414C              # SO_MARK of the daemon's UDP socket ("AL")
TABLE = 0x414C               # routing table holding the tunnel's default route
PRIORITY = 32600             # rule P; P-1 and P-2 are used too (after users' rules, before main's 32766)
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RT_TABLE_COMPAT, RT_TABLE_DEFAULT, RT_TABLE_MAIN, RT_TABLE_LOCAL = 252, 253, 254, 255
TABLE_NAMES = {"default": RT_TABLE_DEFAULT, "main": RT_TABLE_MAIN, "local": RT_TABLE_LOCAL}
FIB_RULE_INVERT = 0x2        # linux/fib_rules.h ("not ..."); pyroute2 has no name for it
RTN_UNICAST = rtnl.rtypes["RTN_UNICAST"]
RTN_UNREACHABLE = rtnl.rtypes["RTN_UNREACHABLE"]
SCOPE_UNIVERSE, SCOPE_LINK, SCOPE_NOWHERE = (rtnl.rt_scope[s] for s in ("universe", "link", "nowhere"))
NL_ERRORS = (OSError, NetlinkError)
_ABSENT = (errno.ENOENT, errno.ESRCH)   # "already gone" answers to a delete
_KEEP = object()
V4, V6 = socket.AF_INET, socket.AF_INET6
ANY = {V4: "0.0.0.0", V6: "::"}           # a family's default destination
HOST_LEN = {V4: 32, V6: 128}
OWN_PORTIDS: set[int] = set()          # port ids of ClientRoutes' sockets: the monitor ignores their changes

OriginalGateway = namedtuple("OriginalGateway", "gateway dev ifindex")   # main's default route (next hop may be None)


class RouteError(Exception):
    """Routes or rules could not be set up; the message is one line."""


def _err_text(e: BaseException) -> str:
    if isinstance(e, NetlinkError):
        return str(e.args[1]) if len(e.args) > 1 else os.strerror(e.code)
    return (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__


def ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _ifname(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


def _table_name(table: int) -> str:
    return {v: k for k, v in TABLE_NAMES.items()}.get(table, str(table))


def family_of(address: str) -> int:
    return V6 if ":" in address else V4


def kernel_has_ipv6() -> bool:
    """Whether this kernel runs IPv6 at all (not booted with ipv6.disable=1)."""
    return os.path.exists("/proc/net/if_inet6")


def mark_socket(sock: socket.socket, fwmark: int = FWMARK) -> None:
    """Give the daemon's UDP socket the fwmark that keeps its datagrams out of the tunnel (needs CAP_NET_ADMIN)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
    except OSError as e:
        raise RouteError(f"cannot set SO_MARK {fwmark:#x} on the UDP socket: {e.strerror} "
                         "(needs CAP_NET_ADMIN)") from None


def resolve_table(table: str | int, what: str = "chnroute.table") -> int:
    """A table number, or a name from /etc/iproute2/rt_tables (and rt_tables.d/*.conf, read by pyroute2)."""
    if isinstance(table, str) and not table.strip().isdigit():
        name = table.strip()
        try:
            table = TABLE_NAMES.get(name) or RtTablesFile().name2id.get(name)
        except (OSError, ValueError) as e:
            raise RouteError(f"{what} {name!r}: cannot read /etc/iproute2/rt_tables: {e}") from None
        if table is None:
            raise RouteError(f"{what} {name!r} is neither a number nor a table name in /etc/iproute2/rt_tables")
    table = int(table)
    if not 1 <= table <= 0xFFFFFFFF or table in (RT_TABLE_LOCAL, RT_TABLE_COMPAT):
        raise RouteError(f"{what} {table} cannot be used (1..4294967295, not local 255 or compat 252)")
    return table


# ---------------------------------------------------------------- routes and rules
@dataclass(frozen=True)
class Route:
    """A route: one we want, or one read from the kernel. Kernel identity: (family, table, dst, dst_len, metric)."""
    table: int
    dst: str
    dst_len: int
    gateway: str | None
    oif: int = 0                # 0: let the kernel find the device for the gateway
    metric: int = ALPACA_METRIC
    why: str = ""
    proto: int = ALPACA_RTPROTO
    type: int = RTN_UNICAST
    family: int = V4

    @property
    def key(self) -> tuple:
        return (self.family, self.table, self.dst, self.dst_len, self.metric)

    def satisfied_by(self, actual: Route | None) -> bool:
        return (actual is not None and actual.type == self.type and actual.gateway == self.gateway
                and self.oif in (0, actual.oif))

    def nl(self, delete: bool = False) -> dict:
        """Keyword arguments for IPRoute.route("replace" | "del")."""
        spec = {"family": self.family, "dst": self.dst, "dst_len": self.dst_len, "table": self.table,
                "proto": ALPACA_RTPROTO, "priority": self.metric, "type": self.type}   # a delete names its type
        if delete:
            return spec | {"scope": SCOPE_NOWHERE}          # whatever scope it got
        spec["scope"] = SCOPE_UNIVERSE if self.gateway or self.type != RTN_UNICAST else SCOPE_LINK
        return spec | ({"gateway": self.gateway} if self.gateway else {}) | ({"oif": self.oif} if self.oif else {})

    def text(self, dev: str | None = None) -> str:
        dst = "default" if self.dst_len == 0 else f"{self.dst}/{self.dst_len}"
        if self.type == RTN_UNREACHABLE:
            dst = f"unreachable {dst}"
        via = f" via {self.gateway}" if self.gateway else ""
        dev = dev or (_ifname(self.oif) or self.oif if self.oif else None)
        dev = f" dev {dev}" if dev else ""
        return (f"{'IPv6 ' if self.family == V6 else ''}{dst}{via}{dev} table {_table_name(self.table)} "
                f"metric {self.metric} proto {ALPACA_RTPROTO}")


@dataclass(frozen=True)
class Rule:
    priority: int
    table: int
    fwmark: int | None = None
    invert: bool = False
    suppress: int | None = None
    family: int = V4

    def nl(self) -> dict:
        """Keyword arguments for IPRoute.rule("add" | "del")."""
        spec = {"family": self.family, "priority": self.priority, "table": self.table, "action": "to_tbl",
                "protocol": ALPACA_RTPROTO, "flags": FIB_RULE_INVERT if self.invert else 0}
        if self.fwmark is not None:
            spec.update(fwmark=self.fwmark, fwmask=0xFFFFFFFF)
        return spec | ({"suppress_prefixlen": self.suppress} if self.suppress is not None else {})

    def text(self) -> str:
        mark = f" {'not ' if self.invert else ''}fwmark {self.fwmark:#x}" if self.fwmark is not None else ""
        suppress = f" suppress_prefixlength {self.suppress}" if self.suppress is not None else ""
        return (f"{'IPv6 ' if self.family == V6 else ''}{self.priority}: from all{mark} lookup "
                f"{_table_name(self.table)}{suppress} proto {ALPACA_RTPROTO}")


def _canonical6(address: str | None) -> str | None:
    return None if address is None else str(ipaddress.IPv6Address(address))


def route_of(msg) -> Route:
    oif, gateway = msg.get("oif") or 0, msg.get("gateway")
    if not oif and msg.get("multipath"):          # a multipath route: its first next hop
        hop = msg.get("multipath")[0]
        oif, gateway = hop["oif"], hop.get("gateway")
    family, dst = msg.get("family") or V4, msg.get("dst")
    if family == V6:                              # one spelling of each address, as ours are written
        dst, gateway = _canonical6(dst), _canonical6(gateway)
    return Route(msg.get("table"), dst or ANY.get(family, "0.0.0.0"), msg["dst_len"], gateway, oif,
                 msg.get("priority") or 0, proto=msg["proto"], type=msg["type"], family=family)


def _families(wanted=(V4, V6)) -> tuple[int, ...]:
    """The families of `wanted` this kernel has (no IPv6 dump on a kernel without IPv6)."""
    return tuple(f for f in wanted if f == V4 or kernel_has_ipv6())


def _routes(ipr: IPRoute, families=(V4,)) -> list[Route]:
    """All routes of every table in these families: one dump each."""
    return [route_of(m) for family in families for m in ipr.route("dump", family=family)]


def _our_rules(ipr: IPRoute, families=(V4,)) -> set[Rule]:
    out = set()
    for m in (m for family in families for m in ipr.get_rules(family=family)):
        if m.get("protocol") == ALPACA_RTPROTO:
            suppress = m.get("suppress_prefixlen")
            out.add(Rule(m.get("priority") or 0, m.get("table"), m.get("fwmark"), bool(m["flags"] & FIB_RULE_INVERT),
                         None if suppress in (None, 0xFFFFFFFF) else suppress, family=m["family"]))
    return out


def _delete(ipr: IPRoute, rules, routes) -> tuple[int, list[str]]:
    """Delete rules (in the order given), then routes; "already gone" is fine.
    Returns how many the kernel deleted and a line for each one it refused."""
    deleted, problems = 0, []
    for method, item, spec in ([(ipr.rule, r, r.nl()) for r in rules]
                               + [(ipr.route, r, r.nl(delete=True)) for r in routes]):
        try:
            method("del", **spec)
            deleted += 1
        except NetlinkError as e:
            if e.code not in _ABSENT:
                problems.append(f"{type(item).__name__.lower()} {item.text()}: {_err_text(e)}")
    return deleted, problems


def _pick_default(main: list[Route], tun: int | None, family: int = V4) -> OriginalGateway | None:
    """The main table's default route of this family with the lowest metric, not ours, not into the tunnel."""
    candidates = [r for r in main if r.dst_len == 0 and r.type == RTN_UNICAST and r.proto != ALPACA_RTPROTO
                  and r.oif and r.oif != tun and r.family == family]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: r.metric)
    return OriginalGateway(best.gateway, _ifname(best.oif) or str(best.oif), best.oif)


def _covering(main: list[Route], host: str, tun: int | None) -> Route | None:
    """The most specific non-default main route (not ours, not into the tunnel) that already routes host."""
    addr = ipaddress.ip_address(host)
    found = [r for r in main if r.dst_len and r.proto != ALPACA_RTPROTO and r.type == RTN_UNICAST and r.oif
             and r.oif != tun and addr in ipaddress.ip_network(f"{r.dst}/{r.dst_len}", strict=False)]
    return max(found, key=lambda r: r.dst_len, default=None)


def _gw_text(gw: OriginalGateway) -> str:
    return f"{'via ' + gw.gateway + ' ' if gw.gateway else ''}dev {gw.dev}"


# ---------------------------------------------------------------- client routes
def _ipv4(value, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        raise RouteError(f"{what} {value!r} is not an IPv4 address") from None


def _ip_hosts(hosts) -> list[str]:
    """IPv4 and IPv6 addresses (anything else is skipped), no duplicates."""
    out = []
    for host in hosts:
        try:
            out.append(str(ipaddress.ip_address(str(host))))
        except ValueError:
            pass
    return list(dict.fromkeys(out))


def _ip_nets(nets) -> list[tuple[str, int]]:
    out = []
    for n in nets:
        try:
            net = ipaddress.ip_network(str(n), strict=False)
        except ValueError:
            raise RouteError(f"local_routes: {n!r} is not an IPv4 or IPv6 network") from None
        if net.prefixlen == 0:
            raise RouteError(f"local_routes: {net} would be a second default route; not allowed")
        out.append((str(net.network_address), net.prefixlen))
    return list(dict.fromkeys(out))


class ClientRoutes:
    """The client's routing. apply() is idempotent, remove() its exact inverse.

    IPv6 (self.ipv6): "tunnel" when the tunnel carries it (gateway6, the gateway's tunnel IPv6 address),
    else "block" with block_ipv6 (an unreachable default stands where the tunnel's would), else None:
    IPv6 is left alone, as is every IPv6 entry of underlay_hosts, local_routes and chnroute."""

    def __init__(self, tun_name: str, gateway_ip: str, underlay_hosts: list[str], local_routes: list[str],
                 chnroute: ChnRoute | None = None, fwmark: int = FWMARK, table: int = TABLE,
                 priority: int = PRIORITY, kill_switch: bool = False, gateway6: str | None = None,
                 block_ipv6: bool = False):
        self.tun_name = tun_name
        self.kill_switch = kill_switch
        self.gateway_ip = _ipv4(gateway_ip, "tunnel gateway")
        self.gateway6 = None if gateway6 is None else _canonical6(gateway6)
        self.ipv6 = ("tunnel" if gateway6 is not None else "block" if block_ipv6 else None) \
            if kernel_has_ipv6() else None
        self.families = (V4, V6) if self.ipv6 else (V4,)
        self.fwmark = fwmark
        self.table = resolve_table(table, "routing table")
        if self.table in (RT_TABLE_MAIN, RT_TABLE_DEFAULT):
            raise RouteError(f"routing table {self.table} is a system table; choose a table of its own")
        if not 3 <= priority <= 32765:
            raise RouteError(f"rule priority {priority} out of range 3..32765")
        self.priority = priority
        self.underlay_hosts = _ip_hosts(underlay_hosts)
        self.local_routes = _ip_nets(local_routes)
        self._set_chnroute(chnroute)
        self.originals: dict[int, OriginalGateway | None] = {V4: None, V6: None}    # main's default, per family
        self._routes: dict[tuple, Route] = {}     # ours in the kernel, by identity: what remove() deletes
        self._rules: set[Rule] = set()
        self._applied = False
        self._default_missing_reported = {V4: False, V6: False}
        self._ipr: IPRoute | None = None          # kept open: the monitor knows our changes by its port id
        self._port = 0
        self.last_chnroute_seconds: float | None = None

    def _set_chnroute(self, chnroute: ChnRoute | None) -> None:
        self.chnroute, self.chn_table, self.chn_gateway, self._chn_data = chnroute, None, None, None
        if chnroute is not None:
            self.chn_table = resolve_table(chnroute.table)
            if self.chn_table == self.table:
                raise RouteError(f"chnroute.table {self.chn_table} is the tunnel's own table; choose another")
            if chnroute.gateway != CHN_ORIGINAL:
                try:        # an address serves its family's prefixes; the other family's follow its original
                    self.chn_gateway = str(ipaddress.ip_address(chnroute.gateway))
                except ValueError:
                    raise RouteError(f"chnroute.gateway {chnroute.gateway!r} is not an IP address") from None

    @property
    def original_gateway(self) -> OriginalGateway | None:
        """The main table's IPv4 default route (the IPv6 one: originals[V6])."""
        return self.originals[V4]

    def _chn_hop(self, family: int, original: OriginalGateway | None) -> tuple[str | None, int] | None:
        """(gateway, oif) of the chnroute prefixes of this family; None: nowhere to send them now."""
        if self.chn_gateway is not None and family_of(self.chn_gateway) == family:
            return self.chn_gateway, 0
        return None if original is None else (original.gateway, original.ifindex)

    def _chn_via(self, original: OriginalGateway | None, family: int = V4) -> str:
        """Where the chnroute prefixes go, for people."""
        if self.chn_gateway is not None and family_of(self.chn_gateway) == family:
            return self.chn_gateway
        if original is None:
            return "the original gateway (none now: added when the main table has a default route)"
        return f"the original gateway (now {_gw_text(original)})"

    def chnroute_data(self, warn: bool = False) -> ChnrouteData | None:
        """The chnroute file, read on first use; warn: log its problems (one line)."""
        if self.chnroute is not None and self._chn_data is None:
            self._chn_data = read_chnroute(self.chnroute.data)
        if warn and self._chn_data is not None and (summary := self._chn_data.summary(self.chnroute.data)):
            log.warning("%s", summary)
        return self._chn_data

    def _nl(self) -> IPRoute:
        if self._ipr is None:
            ipr = IPRoute(ext_ack=True)
            try:
                ipr.bind(groups=0)             # no events; a port id of its own now, for the monitor to ignore
            except BaseException:
                ipr.close()
                raise
            self._ipr, self._port = ipr, ipr.getsockname()[0]
            OWN_PORTIDS.add(self._port)
        return self._ipr

    def close(self) -> None:
        """Close the netlink socket (remove() does this too)."""
        if self._ipr is not None:
            OWN_PORTIDS.discard(self._port)
            self._ipr.close()
            self._ipr = None

    def rules(self) -> list[Rule]:
        out = []
        for family in self.families:
            out.append(Rule(self.priority - 2, RT_TABLE_MAIN, suppress=0, family=family))
            if self.chn_table is not None and self.chn_table != RT_TABLE_MAIN:
                out.append(Rule(self.priority - 1, self.chn_table, suppress=0, family=family))
            out.append(Rule(self.priority, self.table, fwmark=self.fwmark, invert=True, family=family))
        return out

    def apply(self, adopt_leftovers: bool = False) -> None:
        """Install everything; applying again changes nothing that is already right. adopt_leftovers:
        routes and rules tagged by an earlier (killed) run were left in place, so that its kill switch
        kept blocking until now; take over those still wanted, then delete the rest."""
        if ifindex(self.tun_name) is None:
            raise RouteError(f"cannot route into the tunnel: device {self.tun_name!r} does not exist")
        self._applied = True
        self.chnroute_data(warn=True)
        try:
            _, failures = self._sync(first=True)
            if adopt_leftovers:
                self._delete_leftovers()
        except NL_ERRORS as e:
            self.close()
            raise RouteError(f"cannot set up the client routes: {_err_text(e)}") from None
        if essential := [f for f in failures if f[0].why != "chnroute"]:
            route, err = essential[0]
            raise RouteError(f"cannot add route {route.text()}: {_err_text(err)}"
                             + (f" (and {len(essential) - 1} more)" if len(essential) > 1 else ""))
        if failures:
            family = failures[0][0].family
            log.warning("chnroute: %d of %d prefixes could not be added via %s (%s); they use the tunnel",
                        len(failures), len(self.chnroute_data().prefixes),
                        self._chn_via(self.originals[family], family), _err_text(failures[0][1]))

    def _delete_leftovers(self) -> None:
        """Delete what is tagged as ours in the kernel but not in this run's plan (apply(adopt_leftovers))."""
        ipr = self._nl()
        tagged = [r for r in _routes(ipr, _families()) if r.proto == ALPACA_RTPROTO]
        if _other_instance(tagged, self.tun_name):
            return
        rules = sorted(_our_rules(ipr, _families()) - self._rules, key=lambda r: -r.priority)
        routes = [r for r in tagged if r.key not in self._routes]
        deleted, problems = _delete(ipr, rules, routes)
        if deleted:
            log.info("routes: removed %d routes/rules an earlier run left and this one does not use", deleted)
        for problem in problems:
            log.warning("could not delete leftover %s", problem)

    def remove(self, keep_kill_switch: bool = False) -> None:
        """Delete exactly what apply() (and reapply) added: the tunnel rules first, so that traffic leaves
        the tunnel table before it empties, then the other rules, then the routes. keep_kill_switch (the
        daemon ends without being asked to): delete nothing, so that once the TUN device and its route
        are gone the kill switch blocks, as after SIGKILL; `alpaca-tunnel cleanup` removes it all."""
        self._applied = False
        if keep_kill_switch and self.kill_switch:
            self._rules.clear()
            self._routes.clear()
            self.close()
            return
        problems = []
        try:
            if self._routes or self._rules:
                rules = sorted(self._rules, key=lambda r: -r.priority)
                problems = _delete(self._nl(), rules, self._routes.values())[1]
        except NL_ERRORS as e:
            problems.append(f"netlink: {_err_text(e)}; `alpaca-tunnel cleanup` removes what is left")
        self._rules.clear()
        self._routes.clear()
        self.close()
        if problems:
            log.warning("could not remove %d routes/rules, first: %s", len(problems), problems[0])

    def describe(self) -> list[str]:
        """What apply() would install, one human line each (for `alpaca-tunnel check`)."""
        tun = ifindex(self.tun_name) or 0
        lines = [f"fwmark {self.fwmark:#x} on the daemon's UDP socket: its own datagrams use the main table"]
        try:
            with IPRoute() as ipr:
                main = [r for r in _routes(ipr, self.families) if r.table == RT_TABLE_MAIN]
        except NL_ERRORS as e:
            main = []
            lines.append(f"cannot read the main table: {_err_text(e)}")
        originals = {family: _pick_default(main, tun, family) for family in self.families}
        for family, original in originals.items():
            name = "" if family == V4 else "IPv6 "
            lines.append(f"main table has no {name}default route: no {name}routes via the original gateway until "
                         "one appears" if original is None else
                         f"original {name}default route: {_gw_text(original)} (left untouched)")
        lines += [f"rule {rule.text()}" for rule in self.rules()]
        for route in self._plan(main, tun, originals[V4], False, originals.get(V6)).values():
            lines.append(f"route {route.text(self.tun_name if route.why == 'tunnel default' else None)} ({route.why})")
        for host in self.underlay_hosts:
            if family_of(host) in self.families and (cover := _covering(main, host, tun)) is not None:
                lines.append(f"no host route for {host}: main already routes it via "
                             f"{cover.dst}/{cover.dst_len} dev {_ifname(cover.oif) or cover.oif}")
        return lines + self._describe_chnroute(originals) + self._describe_ipv6()

    def _describe_chnroute(self, originals: dict[int, OriginalGateway | None]) -> list[str]:
        if (data := self.chnroute_data()) is None:
            return []
        lines = []
        for family in (V4, V6):
            count = sum(family_of(dst) == family for dst, _ in data.prefixes)
            if family not in self.families:
                lines += [f"chnroute: {count} IPv6 prefixes unused (IPv6 is left alone)"] if count else []
            elif count or family == V4:
                lines.append(f"chnroute: {count} {'IPv6 ' if family == V6 else ''}prefixes from {self.chnroute.data} "
                             f"via {self._chn_via(originals.get(family), family)} in table "
                             f"{_table_name(self.chn_table)} metric {ALPACA_METRIC} proto {ALPACA_RTPROTO}")
        return lines + ([summary] if (summary := data.summary(self.chnroute.data)) else [])

    def _describe_ipv6(self) -> list[str]:
        """What happens to IPv6, in one line."""
        if self.ipv6 == "tunnel":
            return [f"IPv6: into the tunnel via {self.gateway6}, like IPv4"
                    + (" (the kill switch blocks it too)" if self.kill_switch else "")]
        if self.ipv6 == "block":
            return ["IPv6: the tunnel carries none (net6 off, or no IPv6 address on the TUN): blocked beyond "
                    "the LAN, local_routes and chnroute (block_ipv6)"]
        if not kernel_has_ipv6():
            return ["IPv6: this kernel has none; nothing to route or block"]
        unused = [h for h in self.underlay_hosts + [d for d, _ in self.local_routes] if family_of(h) == V6]
        return ["IPv6: the tunnel carries none and block_ipv6 is off: IPv6 leaves outside the tunnel"
                + (f"; {len(unused)} IPv6 underlay/local_routes entries unused" if unused else "")]

    def update(self, underlay_hosts: list[str] | None = None, local_routes: list[str] | None = None,
               chnroute=_KEEP) -> str | None:
        """Live changes: underlay addresses (a server's name now resolves elsewhere), local_routes, or
        chnroute (a reload; passing it re-reads the file, None drops chnroute). Only the difference is
        changed in the kernel; returns one log line or None. Raises RouteError only for bad arguments."""
        if underlay_hosts is not None:
            self.underlay_hosts = _ip_hosts(underlay_hosts)
        if local_routes is not None:
            self.local_routes = _ip_nets(local_routes)
        if chnroute is not _KEEP:
            self._set_chnroute(chnroute)
            self.chnroute_data(warn=True)
        return self.reapply_if_needed()

    def reapply_if_needed(self) -> str | None:
        """After a monitor event: if the original gateway changed or something of ours is missing or
        stale, fix only that and return one log line; None when nothing needed doing. Never raises."""
        if not self._applied:
            return None
        try:
            return self._sync(first=False)[0]
        except (*NL_ERRORS, RouteError) as e:
            self.close()          # start the next attempt on a fresh socket
            return f"routes: could not check or re-apply the client routes: {_err_text(e)}"

    def _plan(self, main: list[Route], tun: int, original: OriginalGateway | None,
              with_chnroute: bool = True, original6: OriginalGateway | None = None) -> dict[tuple, Route]:
        """Every route wanted, by kernel identity; original(6): main's IPv4 (IPv6) default route now."""
        routes = []
        for family, orig in ((V4, original), (V6, original6)):
            if family in self.families:
                routes += self._family_plan(family, main, tun, orig, with_chnroute)
        plan: dict[tuple, Route] = {}
        for route in routes:
            plan.setdefault(route.key, route)
        return plan

    def _family_plan(self, family: int, main: list[Route], tun: int, original: OriginalGateway | None,
                     with_chnroute: bool) -> list[Route]:
        default = ANY[family]
        gateway = self.gateway_ip if family == V4 else self.gateway6
        if gateway is None:     # IPv6 the tunnel does not carry (block_ipv6): refused rather than leaked
            routes = [Route(self.table, default, 0, None, why="IPv6 blocked", type=RTN_UNREACHABLE, family=family)]
        else:
            routes = [Route(self.table, default, 0, gateway, tun, why="tunnel default", family=family)]
        if self.kill_switch and gateway is not None:   # what the table answers once the TUN (and its route) is gone
            routes.append(Route(self.table, default, 0, None, metric=KILL_SWITCH_METRIC, why="kill switch",
                                type=RTN_UNREACHABLE, family=family))
        if original is not None:
            gw, oif = original.gateway, original.ifindex
            routes += [Route(RT_TABLE_MAIN, host, HOST_LEN[family], gw, oif, why="server/forwarder underlay address",
                             family=family)
                       for host in self.underlay_hosts if family_of(host) == family and _covering(main, host, tun) is None]
            routes += [Route(RT_TABLE_MAIN, dst, plen, gw, oif, why="local_routes", family=family)
                       for dst, plen in self.local_routes if family_of(dst) == family]
        # chnroute "original": via the original gateway, moving with it; none until there is one
        if with_chnroute and (data := self.chnroute_data()) is not None \
                and (hop := self._chn_hop(family, original)) is not None:
            routes += [Route(self.chn_table, dst, plen, *hop, why="chnroute", family=family)
                       for dst, plen in data.prefixes if family_of(dst) == family]
        return routes

    def _sync(self, first: bool) -> tuple[str | None, list[tuple[Route, NetlinkError]]]:
        """Compare the wanted state with the kernel's and change only the difference: routes first (so that
        what the rules point to is in place when they appear), then rules, then what is ours but no longer
        wanted. Returns one log line (None: nothing to do) and the routes the kernel refused."""
        tun = ifindex(self.tun_name)
        if tun is None:
            return None, []     # the daemon is going down; nothing to route into
        ipr = self._nl()
        kernel = _routes(ipr, self.families)
        main = [r for r in kernel if r.table == RT_TABLE_MAIN]
        notes = [note for family in self.families
                 for note in self._follow_original_gateway(_pick_default(main, tun, family), first, family)]
        plan = self._plan(main, tun, self.originals[V4], original6=self.originals[V6])
        actual = {r.key: r for r in kernel if r.proto == ALPACA_RTPROTO}
        to_set = [r for key, r in plan.items() if not r.satisfied_by(actual.get(key))]
        wanted_rules, present_rules = self.rules(), _our_rules(ipr, self.families)
        missing_rules = [r for r in wanted_rules if r not in present_rules]
        self._rules.update(r for r in wanted_rules if r in present_rules)
        stale = [r for key, r in self._routes.items() if key not in plan]
        stale_rules = [r for r in self._rules if r not in wanted_rules]
        if not (to_set or missing_rules or stale or stale_rules or notes):
            self._routes = plan
            return None, []

        failures = self._set_routes(ipr, to_set)
        failed = {route.key for route, _ in failures}
        self._routes = {key: r for key, r in plan.items() if key not in failed or key in actual}
        for rule in missing_rules:
            try:
                ipr.rule("add", **rule.nl())
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise RouteError(f"cannot add rule {rule.text()}: {_err_text(e)}") from None
            self._rules.add(rule)
        self._rules.difference_update(stale_rules)
        for problem in _delete(ipr, stale_rules, stale)[1]:
            log.warning("could not delete stale %s", problem)

        return "routes: " + "; ".join(notes + _changes(to_set, missing_rules, stale, stale_rules, failures)), failures

    def _set_routes(self, ipr: IPRoute, to_set: list[Route]) -> list[tuple[Route, NetlinkError]]:
        """Replace each route (chnroute's last, timed); the ones the kernel refused."""
        failures = []
        for chnroute in (False, True):
            started = time.perf_counter()
            for route in (group := [r for r in to_set if (r.why == "chnroute") == chnroute]):
                try:
                    ipr.route("replace", **route.nl())
                except NetlinkError as e:
                    failures.append((route, e))     # the kernel kept what it had under that key
            if chnroute and group:
                self.last_chnroute_seconds = time.perf_counter() - started
        return failures

    def _follow_original_gateway(self, current: OriginalGateway | None, first: bool, family: int = V4) -> list[str]:
        """The main table's default route of a family is the original gateway the underlay
        routes go via; what changed about it, as log notes."""
        name = "" if family == V4 else "IPv6 "
        if first:
            self.originals[family], self._default_missing_reported[family] = current, current is None
        notes = []
        if current is None:            # keep the underlay routes until a default route comes back
            if not self._default_missing_reported[family] and self.originals[family] is not None:
                notes.append(f"the main table lost its {name}default route; keeping {name}underlay routes via "
                             f"{_gw_text(self.originals[family])} until one comes back")
            self._default_missing_reported[family] = True
        else:
            if current != self.originals[family]:
                old = _gw_text(self.originals[family]) if self.originals[family] else "none"
                notes.append(f"original {name}gateway {old} -> {_gw_text(current)}")
            self.originals[family], self._default_missing_reported[family] = current, False
        return notes


def _changes(to_set, missing_rules, stale, stale_rules, failures) -> list[str]:
    """What a sync did, for its log line."""
    what = []
    if other := [r for r in to_set if r.why != "chnroute"]:
        what.append(f"{plural(len(other), 'route')} set ({', '.join(sorted({r.why for r in other}))})")
    if chn_set := len(to_set) - len(other):
        what.append(f"{chn_set} chnroute prefixes re-added")
    if missing_rules:
        what.append(f"{plural(len(missing_rules), 'rule')} restored")
    if stale or stale_rules:
        what.append(plural(len(stale), "stale route")
                    + (f" and {plural(len(stale_rules), 'stale rule')}" if stale_rules else "") + " removed")
    if failures:
        what.append(f"{len(failures)} failed ({failures[0][0].text()}: {_err_text(failures[0][1])})")
    return what


# ---------------------------------------------------------------- cleanup
def _other_instance(tagged: list[Route], tun_name: str) -> bool:
    """Whether a tagged tunnel default route goes out through an existing device other than tun_name:
    another alpaca-tunnel client runs, and the tagged routes and rules are its own (logged). (An
    unreachable route is no device's: the kernel shows IPv6 ones on lo.)"""
    for name in {_ifname(r.oif) for r in tagged if r.dst_len == 0 and r.oif and r.type == RTN_UNICAST} \
            - {None, tun_name}:
        log.warning("cleanup: routes tagged proto %d belong to a running alpaca-tunnel on %s; "
                    "leaving them alone", ALPACA_RTPROTO, name)
        return True
    return False


def cleanup(tun_name: str) -> int:
    """Remove routes and rules a previous (killed) run left behind: everything tagged with
    ALPACA_RTPROTO, IPv4 and IPv6, in any table. Untagged routes and rules are never touched. If a
    tagged tunnel default route still goes out through an existing device other than tun_name, another
    alpaca-tunnel client is running: nothing is removed. Returns how many were removed."""
    with IPRoute(ext_ack=True) as ipr:
        routes = [r for r in _routes(ipr, _families()) if r.proto == ALPACA_RTPROTO]
        if _other_instance(routes, tun_name):
            return 0
        rules = sorted(_our_rules(ipr, _families()), key=lambda r: -r.priority)
        deleted, problems = _delete(ipr, rules, routes)
    for problem in problems:
        log.warning("cleanup: cannot delete %s", problem)
    return deleted
