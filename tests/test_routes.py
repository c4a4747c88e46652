"""Client routing (alpaca/host/routes.py): policy routing into the tunnel, chnroute, monitor, lookup, cleanup.

Every root test builds its own namespace "client" (Testbed, unique prefix) with
eth0 on 172.31.77.0/24, a default route via a fake gateway 172.31.77.254 and a
stand-in for the TUN device ("alpaca0", 10.17.16.1/16, up). The code under test
runs in a child process that lives in that namespace, as the daemon would
(plain netlink sockets in the current netns); the tests look from outside with
`ip -n <ns> ...`. Nothing outside the test's namespaces is touched.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alpaca.lab import testbed
from alpaca.host import chnroute, routes
from alpaca.config import ChnRoute

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()

GW = "172.31.77.254"          # the "original" default gateway (need not exist)
GW2 = "172.31.77.253"         # the gateway DHCP switches to
CHN_GW = "172.31.77.252"      # chnroute.gateway
TUN_GW = "10.17.1.1"          # the tunnel gateway's tunnel address
SERVERS = ["198.51.100.7", "203.0.113.9", "172.31.77.1"]   # the last one is on the LAN
LOCAL = ["192.168.50.0/24", "10.99.3.4/16"]
TAG = f"proto {routes.ALPACA_RTPROTO}"

PRELUDE = """
import json, logging, select, socket, subprocess, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from alpaca.host import route_lookup, route_monitor, routes
from alpaca.config import ChnRoute
def ip(*args):
    subprocess.run(["ip", *args], check=True)
"""


# ---------------------------------------------------------------- fixtures and helpers
class Client:
    def __init__(self, tb: testbed.Testbed):
        self.tb = tb
        self.ns = tb.ns("client")

    def ip(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(["ip", "-n", self.ns, *args], capture_output=True, text=True, check=False)
        if check:
            assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"
        return r.stdout

    def snapshot(self) -> str:
        return self.ip("-4", "route", "show", "table", "all") + self.ip("-4", "rule", "show")

    def route_get(self, dst: str, *extra: str) -> str:
        return self.ip("-4", "route", "get", dst, *extra).splitlines()[0]

    def py(self, code: str, setup: str = "", timeout: float = 60) -> dict:
        """Run setup + code in a child process inside the namespace; it prints one JSON line last."""
        r = self.tb.run("client", [sys.executable, "-c", PRELUDE + setup + textwrap.dedent(code)],
                        timeout=timeout, env=_env(), cwd=str(ROOT))
        assert r.returncode == 0, f"child failed:\n{r.stdout}\n{r.stderr}"
        out = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
        out["_stderr"] = r.stderr
        return out

    def apply_and_kill(self, setup: str) -> None:
        """A process that applies the routes of `setup` (which makes `cr`), killed with SIGKILL after."""
        proc = self.popen("""
            cr.apply()
            print("ready", flush=True)
            time.sleep(120)
        """, setup=setup)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        self.tb.stop(proc, signal.SIGKILL)

    def popen(self, code: str, setup: str = "") -> subprocess.Popen:
        return self.tb.popen("client", [sys.executable, "-c", PRELUDE + setup + textwrap.dedent(code)],
                             env=_env(), cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.fixture
def client():
    from pyroute2 import NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    tb = testbed.Testbed(f"ar{os.getpid() % 100000}{next(_counter)}")
    try:
        tb.add_host("client", 10)
        with NetNS(tb.ns("client")) as ns:
            try:
                ns.link("add", ifname="alpaca0", kind="dummy")
            except NetlinkError:       # no dummy module here: a veth pair stands in just as well
                ns.link("add", ifname="alpaca0", kind="veth", peer="alpaca0p")
                ns.link("set", index=ns.link_lookup(ifname="alpaca0p")[0], state="up")
            idx = ns.link_lookup(ifname="alpaca0")[0]
            ns.addr("add", index=idx, address="10.17.16.1", prefixlen=16)
            ns.link("set", index=idx, state="up")
        c = Client(tb)
        c.ip("route", "add", "default", "via", GW, "dev", "eth0")
        yield c
    finally:
        tb.close()


def client_routes_code(chn: str | None = None, hosts=SERVERS, local=LOCAL) -> str:
    chn_arg = f"ChnRoute(100, {CHN_GW!r}, {chn!r})" if chn else "None"
    return f"cr = routes.ClientRoutes('alpaca0', {TUN_GW!r}, {list(hosts)!r}, {list(local)!r}, {chn_arg})\n"


def write_chnroute(path: Path, count: int = 3000) -> Path:
    lines = ["# chnroute test data", ""]
    lines += [f"{100 + i // 250}.{i % 250}.0.0/16" for i in range(count)]
    lines[5:5] = ["not a prefix", "1.2.3.4/33  # bad too", "  # indented comment", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def ours(text: str) -> list[str]:
    return [line for line in text.splitlines() if TAG in line]


# ---------------------------------------------------------------- no root needed
def test_read_chnroute_counts_bad_lines(tmp_path):
    path = tmp_path / "chn.txt"
    path.write_text("# header\n\n1.0.1.0/24\n1.0.2.7/23  # host bits cleared\n8.8.8.8\nnope\n"
                    "0.0.0.0/0\n1.0.1.0/24\n300.1.1.1/8\n")
    data = chnroute.read_chnroute(path)
    assert data.prefixes == [("1.0.1.0", 24), ("1.0.2.0", 23), ("8.8.8.8", 32)]
    assert data.bad == 3
    assert "line 6" in data.first_bad
    summary = data.summary(path)
    assert "3 bad lines ignored" in summary and "\n" not in summary
    missing = chnroute.read_chnroute(tmp_path / "missing.txt")
    assert missing.prefixes == [] and "cannot read" in missing.summary("missing.txt")


def test_tables_and_arguments_are_checked():
    assert routes.resolve_table(100) == 100
    assert routes.resolve_table("100") == 100
    assert routes.resolve_table("main") == 254
    with pytest.raises(routes.RouteError, match="neither a number nor a table name"):
        routes.resolve_table("no-such-table-name")
    with pytest.raises(routes.RouteError, match="cannot be used"):
        routes.resolve_table(255)
    with pytest.raises(routes.RouteError, match="0.0.0.0/0"):
        routes.ClientRoutes("alpaca0", TUN_GW, [], ["0.0.0.0/0"])
    with pytest.raises(routes.RouteError, match="tunnel's own table"):
        routes.ClientRoutes("alpaca0", TUN_GW, [], [], ChnRoute(routes.TABLE, CHN_GW, Path("x")))
    cr = routes.ClientRoutes("alpaca0", TUN_GW, ["198.51.100.7", "2001:db8::1", "198.51.100.7"], [],
                             ChnRoute("main", CHN_GW, Path("x")))
    assert cr.underlay_hosts == ["198.51.100.7", "2001:db8::1"]
    # without an IPv6 side (no gateway6, no block_ipv6) the IPv6 server gets no route
    original = routes.OriginalGateway(GW, "eth0", 2)
    assert [r.dst for r in cr._plan([], 7, original).values() if r.why.startswith("server")] == ["198.51.100.7"]
    # chnroute in main: main is already consulted (suppress rule), no extra rule for it
    assert [r.table for r in cr.rules()] == [254, routes.TABLE]


def test_chnroute_original_follows_the_original_gateway(tmp_path):
    """chnroute.gateway "original": the prefixes go where the main table's default
    route goes (next hop and device), whatever it is now; none while there is none."""
    data = tmp_path / "chn.txt"
    data.write_text("100.64.0.0/24\n100.64.1.0/24\n")
    cr = routes.ClientRoutes("alpaca0", TUN_GW, [], [], ChnRoute(100, "original", data))
    assert cr.chn_gateway is None

    def chn(original):
        return sorted((r.dst, r.gateway, r.oif) for r in cr._plan([], 7, original).values() if r.why == "chnroute")
    assert chn(routes.OriginalGateway(GW, "eth0", 2)) == [("100.64.0.0", GW, 2), ("100.64.1.0", GW, 2)]
    assert chn(routes.OriginalGateway(GW2, "wlan0", 3)) == [("100.64.0.0", GW2, 3), ("100.64.1.0", GW2, 3)]
    assert chn(routes.OriginalGateway(None, "ppp0", 4)) == [("100.64.0.0", None, 4), ("100.64.1.0", None, 4)]
    assert chn(None) == []
    assert cr._chn_via(routes.OriginalGateway(GW, "eth0", 2)) == f"the original gateway (now via {GW} dev eth0)"
    # a literal address stays where it is
    fixed = routes.ClientRoutes("alpaca0", TUN_GW, [], [], ChnRoute(100, CHN_GW, data))
    assert {(r.gateway, r.oif) for r in fixed._plan([], 7, routes.OriginalGateway(GW2, "wlan0", 3)).values()
            if r.why == "chnroute"} == {(CHN_GW, 0)}


# ---------------------------------------------------------------- in a namespace
@pytest.mark.root
def test_apply_routes_default_into_tunnel_and_keeps_underlay(client):
    out = client.py("""
        cr.apply()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        routes.mark_socket(s, routes.FWMARK)
        print(json.dumps({"original": list(cr.original_gateway), "describe": cr.describe(),
                          "mark": s.getsockopt(socket.SOL_SOCKET, routes.SO_MARK)}))
    """, setup=client_routes_code())
    assert out["original"][:2] == [GW, "eth0"]
    assert out["mark"] == routes.FWMARK
    # everything unmarked goes into the tunnel, via the gateway's tunnel address
    assert re.search(rf"via {TUN_GW} dev alpaca0 table {routes.TABLE}\b", client.route_get("8.8.8.8"))
    # the daemon's own (marked) datagrams keep the original uplink
    assert f"via {GW} dev eth0" in client.route_get("8.8.8.8", "mark", hex(routes.FWMARK))
    # servers/forwarders and local_routes stay on the original gateway, also unmarked (ssh to a server)
    for dst in ("198.51.100.7", "203.0.113.9", "192.168.50.3", "10.99.200.1"):
        assert f"via {GW} dev eth0" in client.route_get(dst), dst
    # a server on the LAN keeps its on-link route: no host route via the gateway for it
    assert client.route_get("172.31.77.1").startswith("172.31.77.1 dev eth0")
    # the tunnel network itself stays on the TUN
    assert "dev alpaca0" in client.route_get("10.17.1.1") and "via" not in client.route_get("10.17.1.1")
    rules = client.ip("-4", "rule", "show")
    assert re.search(rf"^{routes.PRIORITY - 2}:\s+from all lookup main suppress_prefixlength 0 {TAG}", rules, re.MULTILINE)
    assert re.search(rf"^{routes.PRIORITY}:\s+not from all fwmark {routes.FWMARK:#x} lookup {routes.TABLE} {TAG}",
                     rules, re.MULTILINE)
    assert len(ours(rules)) == 2
    main = client.ip("-4", "route", "show", "table", "main")
    assert f"198.51.100.7 via {GW} dev eth0 {TAG} metric {routes.ALPACA_METRIC}" in main
    assert f"default via {GW} dev eth0" in main        # the main default route is never touched
    text = "\n".join(out["describe"])
    assert "rule 32600: from all not fwmark 0x414c lookup 16716" in text
    assert f"route default via {TUN_GW} dev alpaca0 table 16716" in text
    assert "no host route for 172.31.77.1" in text


@pytest.mark.root
def test_apply_twice_is_idempotent_and_remove_restores_exactly(client, tmp_path):
    chn = write_chnroute(tmp_path / "chn.txt", 300)
    before = client.snapshot()
    client.py("cr.apply()\nprint('{}')", setup=client_routes_code(str(chn)))
    once = client.snapshot()
    assert once != before
    out = client.py("""
        cr.apply()
        cr.apply()
        r1 = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
        r2 = subprocess.run(["ip", "-4", "rule", "show"], capture_output=True, text=True).stdout
        cr.remove()
        cr.remove()          # already gone is fine
        print(json.dumps({"during": r1 + r2}))
    """, setup=client_routes_code(str(chn)))
    assert out["during"] == once                 # applying again (and again) added nothing
    assert len(ours(once)) == 3 + 1 + 2 + 2 + 300   # 3 rules, tunnel default, 2 servers, 2 local_routes, chnroute
    assert client.snapshot() == before           # the exact inverse


@pytest.mark.root
def test_chnroute_3000_prefixes_installed_and_used(client, tmp_path):
    chn = write_chnroute(tmp_path / "chn.txt", 3000)
    out = client.py("""
        t = time.perf_counter()
        cr.apply()
        total = time.perf_counter() - t
        print(json.dumps({"total": total, "chnroute": cr.last_chnroute_seconds}))
    """, setup=client_routes_code(str(chn)))
    print(f"\n3000 chnroute prefixes: {out['chnroute'] * 1000:.1f} ms in the batch, apply() {out['total'] * 1000:.1f} ms")
    # (the time is printed, not asserted: a shared machine's load decides it;
    # docs/operations.md gives the figures)
    assert out["_stderr"].count("bad line") == 1 and "2 bad lines ignored" in out["_stderr"]
    table = client.ip("-4", "route", "show", "table", "100")
    assert len(table.splitlines()) == 3000
    assert all(TAG in line and f"via {CHN_GW}" in line for line in table.splitlines())
    assert re.search(rf"^{routes.PRIORITY - 1}:\s+from all lookup 100 suppress_prefixlength 0 {TAG}",
                     client.ip("-4", "rule", "show"), re.MULTILINE)
    assert f"via {CHN_GW} dev eth0 table 100" in client.route_get("100.5.1.1")
    assert f"via {CHN_GW} dev eth0 table 100" in client.route_get("111.249.3.3")
    assert f"via {TUN_GW} dev alpaca0" in client.route_get("112.0.0.1")      # not listed: the tunnel
    out = client.py("""
        cr.apply()
        t = time.perf_counter()
        cr.remove()
        print(json.dumps({"remove": time.perf_counter() - t}))
    """, setup=client_routes_code(str(chn)))
    print(f"remove() {out['remove'] * 1000:.1f} ms")
    assert client.ip("-4", "route", "show", "table", "100") == ""


@pytest.mark.root
def test_cleanup_after_sigkill_removes_exactly_the_leftovers(client, tmp_path):
    chn = write_chnroute(tmp_path / "chn.txt", 50)
    before = client.snapshot()
    # things that are not ours, in our table, in main and in the rules (the twin rule comes first in the list)
    client.ip("route", "add", "203.0.113.0/24", "via", GW, "dev", "eth0", "table", str(routes.TABLE))
    client.ip("route", "add", "192.168.50.0/24", "via", GW, "dev", "eth0")    # same prefix as a local_route
    client.ip("rule", "add", "from", "10.9.9.9", "lookup", str(routes.TABLE), "pref", "1000")
    client.ip("rule", "add", "not", "fwmark", "0x414c", "lookup", str(routes.TABLE), "pref", "32600")  # untagged twin
    users = client.snapshot()
    client.apply_and_kill(client_routes_code(str(chn)))
    left = client.snapshot()
    assert len(ours(left)) == 3 + 1 + 2 + 2 + 50

    # another client's TUN (a different name) still carries the tagged default: that is a live run, not leftovers
    out = client.py("print(json.dumps({'removed': routes.cleanup('alpaca9')}))")
    assert out["removed"] == 0 and client.snapshot() == left

    out = client.py("print(json.dumps({'removed': routes.cleanup('alpaca0'), 'again': routes.cleanup('alpaca0')}))")
    assert out["removed"] == 3 + 1 + 2 + 2 + 50 and out["again"] == 0
    after = client.snapshot()
    assert ours(after) == []
    assert after == users
    assert f"203.0.113.0/24 via {GW} dev eth0 table {routes.TABLE}" in after
    assert re.search(rf"^192\.168\.50\.0/24 via {GW} dev eth0 $", client.ip("-4", "route", "show"), re.MULTILINE)
    assert re.search(rf"^1000:\s+from 10\.9\.9\.9 lookup {routes.TABLE}\s*$", after, re.MULTILINE)
    assert re.search(rf"^32600:\s+not from all fwmark 0x414c lookup {routes.TABLE}\s*$", after, re.MULTILINE)
    # remove the user's additions: what is left is exactly the state before the killed run
    client.ip("route", "del", "203.0.113.0/24", "table", str(routes.TABLE))
    client.ip("route", "del", "192.168.50.0/24", "via", GW)
    client.ip("rule", "del", "pref", "1000")
    client.ip("rule", "del", "pref", "32600")
    assert client.snapshot() == before


@pytest.mark.root
def test_monitor_notices_new_default_and_lost_state_and_reapplies(client, tmp_path):
    chn = write_chnroute(tmp_path / "chn.txt", 500)
    out = client.py(f"""
        cr.apply()
        mon = route_monitor.RouteMonitor()
        out = {{"idle": mon.drain(), "nothing": cr.reapply_if_needed()}}
        # DHCP / NetworkManager: the default route goes away and comes back via another gateway
        ip("route", "del", "default")
        ip("route", "add", "default", "via", {GW2!r}, "dev", "eth0")
        t = time.monotonic()
        out["readable"] = bool(select.select([mon], [], [], 5)[0])
        out["drain"] = mon.drain()
        out["line"] = cr.reapply_if_needed()
        out["seconds"] = time.monotonic() - t
        out["original"] = list(cr.original_gateway)
        out["own_changes_seen"] = mon.drain()
        out["again"] = cr.reapply_if_needed()
        # someone deletes our tunnel rule and flushes the chnroute table
        ip("rule", "del", "pref", str(routes.PRIORITY))
        ip("route", "flush", "table", "100")
        select.select([mon], [], [], 5)
        out["drain2"] = mon.drain()
        out["line2"] = cr.reapply_if_needed()
        # the default route disappears for good: one line, the underlay routes stay
        ip("route", "del", "default")
        select.select([mon], [], [], 5)
        out["drain3"] = mon.drain()
        out["line3"] = cr.reapply_if_needed()
        out["line3b"] = cr.reapply_if_needed()
        print(json.dumps(out))
    """, setup=client_routes_code(str(chn)))
    assert out["idle"] is False and out["nothing"] is None
    assert out["readable"] and out["drain"] is True
    assert out["line"] and "\n" not in out["line"]
    assert f"via {GW} dev eth0 -> via {GW2} dev eth0" in out["line"], out["line"]
    assert out["seconds"] < 3
    assert out["original"][:2] == [GW2, "eth0"]
    assert out["own_changes_seen"] is False and out["again"] is None
    assert out["drain2"] is True
    assert "1 rule restored" in out["line2"] and "500 chnroute prefixes re-added" in out["line2"], out["line2"]
    assert out["drain3"] is True and "lost its default route" in out["line3"] and out["line3b"] is None
    main = client.ip("-4", "route", "show", "table", "main")
    for host in ("198.51.100.7", "203.0.113.9"):
        assert f"{host} via {GW2} dev eth0 {TAG}" in main
    assert f"via {GW} " not in main
    assert len(client.ip("-4", "route", "show", "table", "100").splitlines()) == 500
    assert len(ours(client.ip("-4", "rule", "show"))) == 3


@pytest.mark.root
def test_route_lookup_follows_policy_routes(client):
    out = client.py("""
        cr.apply()
        ip("route", "add", "default", "via", "10.17.1.2", "dev", "alpaca0", "table", "200")
        ip("rule", "add", "to", "192.0.2.0/24", "lookup", "200", "pref", "1000")
        lk = route_lookup.RouteLookup("alpaca0")
        a = socket.inet_aton
        out = {"policy": lk.next_hop(a("192.0.2.5")), "default": lk.next_hop(a("8.8.8.8")),
               "server": lk.next_hop(a("198.51.100.7")), "lan": lk.next_hop(a("172.31.77.9")),
               "ipv6": lk.next_hop(socket.inet_pton(socket.AF_INET6, "2001:db8::1"))}
        ip("rule", "del", "pref", "1000")
        out["after"] = lk.next_hop(a("192.0.2.5"))     # no cache here: the core keeps the answers
        print(json.dumps(out))
    """, setup=client_routes_code())
    assert out["policy"] == "10.17.1.2"
    assert out["default"] == TUN_GW
    assert out["server"] is None and out["lan"] is None and out["ipv6"] is None
    assert out["after"] == TUN_GW


@pytest.mark.root
def test_update_changes_only_the_difference_and_remove_stays_exact(client, tmp_path):
    chn = write_chnroute(tmp_path / "chn.txt", 200)
    chn2 = write_chnroute(tmp_path / "chn2.txt", 100)
    before = client.snapshot()
    out = client.py(f"""
        cr.apply()
        mon = route_monitor.RouteMonitor()
        out = {{}}
        out["hosts"] = cr.update(underlay_hosts=["198.51.100.8"])
        out["same"] = cr.update(underlay_hosts=["198.51.100.8"])
        out["chn"] = cr.update(chnroute=ChnRoute(101, {CHN_GW!r}, {str(chn2)!r}))
        out["seen"] = mon.drain()        # our own changes do not wake the daemon
        out["main"] = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
        out["t100"] = subprocess.run(["ip", "-4", "route", "show", "table", "100"], capture_output=True, text=True).stdout
        out["t101"] = subprocess.run(["ip", "-4", "route", "show", "table", "101"], capture_output=True, text=True).stdout
        out["rules"] = subprocess.run(["ip", "-4", "rule", "show"], capture_output=True, text=True).stdout
        cr.remove()
        print(json.dumps(out))
    """, setup=client_routes_code(str(chn)))
    assert "1 route set" in out["hosts"] and "2 stale routes removed" in out["hosts"], out["hosts"]
    assert out["same"] is None
    assert "100 chnroute prefixes re-added" in out["chn"] and "200 stale routes and 1 stale rule removed" in out["chn"]
    assert out["seen"] is False
    assert f"198.51.100.8 via {GW}" in out["main"] and "198.51.100.7" not in out["main"]
    assert out["t100"] == "" and len(out["t101"].splitlines()) == 100
    assert "lookup 101 suppress_prefixlength 0" in out["rules"] and "lookup 100" not in out["rules"]
    assert client.snapshot() == before


# ---------------------------------------------------------------- IPv6
TUN_GW6 = "fd00:5::1:1"       # the gateway's tunnel IPv6 address
GW6 = "2001:db8:77::254"      # the original IPv6 default gateway
SERVERS6 = ["2001:db8:5::7", "2001:db8:77::1"]      # the last one is on the LAN
LOCAL6 = ["2001:db8:50::/48"]


def test_ipv6_plan_tunnel_block_or_nothing(tmp_path):
    """The IPv6 side: into the tunnel with gateway6, an unreachable default with block_ipv6 (no kill-switch
    twin: the block is already there), nothing without either; every IPv6 entry goes via the IPv6 original."""
    data = tmp_path / "chn.txt"
    data.write_text("100.64.0.0/24\n2001:db8:c0::/48\n")
    original, original6 = routes.OriginalGateway(GW, "eth0", 2), routes.OriginalGateway("fe80::1", "eth0", 2)

    def plan(**kw):
        cr = routes.ClientRoutes("alpaca0", TUN_GW, SERVERS + SERVERS6, LOCAL + LOCAL6,
                                 ChnRoute(100, CHN_GW, data), kill_switch=True, **kw)
        return cr, sorted(((r.why, r.dst, r.dst_len, r.gateway, r.type, r.metric)
                           for r in cr._plan([], 7, original, original6=original6).values()
                           if r.family == routes.V6), key=str)
    cr, six = plan(gateway6="fd00:0005::1:1")
    assert cr.ipv6 == "tunnel" and cr.gateway6 == TUN_GW6
    unreachable, unicast = routes.RTN_UNREACHABLE, routes.RTN_UNICAST
    assert six == sorted([
        ("tunnel default", "::", 0, TUN_GW6, unicast, routes.ALPACA_METRIC),
        ("kill switch", "::", 0, None, unreachable, routes.KILL_SWITCH_METRIC),
        ("server/forwarder underlay address", "2001:db8:5::7", 128, "fe80::1", unicast, routes.ALPACA_METRIC),
        ("server/forwarder underlay address", "2001:db8:77::1", 128, "fe80::1", unicast, routes.ALPACA_METRIC),
        ("local_routes", "2001:db8:50::", 48, "fe80::1", unicast, routes.ALPACA_METRIC),
        # chnroute.gateway is IPv4: the IPv6 prefixes follow the original IPv6 gateway
        ("chnroute", "2001:db8:c0::", 48, "fe80::1", unicast, routes.ALPACA_METRIC)], key=str)
    assert [(r.family, r.priority) for r in cr.rules()] == [
        (routes.V4, 32598), (routes.V4, 32599), (routes.V4, 32600),
        (routes.V6, 32598), (routes.V6, 32599), (routes.V6, 32600)]
    assert {r.nl()["family"] for r in cr.rules() if r.family == routes.V6} == {socket.AF_INET6}
    cr, six = plan(block_ipv6=True)
    assert cr.ipv6 == "block" and [s[:5] for s in six if s[0] not in ("local_routes", "chnroute")
                                   and not s[0].startswith("server")] == [("IPv6 blocked", "::", 0, None, unreachable)]
    assert "IPv6 unreachable default table 16716 metric 16716" in next(
        r.text() for r in cr._plan([], 7, None).values() if r.why == "IPv6 blocked")
    cr, six = plan()
    assert cr.ipv6 is None and six == [] and {r.family for r in cr.rules()} == {routes.V4}
    assert "IPv6 leaves outside the tunnel" in cr._describe_ipv6()[0]
    # an IPv4 plan never takes an IPv6 entry, and the other way round
    four = [r for r in plan(gateway6=TUN_GW6)[0]._plan([], 7, original, original6=original6).values()
            if r.family == routes.V4]
    assert all(":" not in r.dst and ":" not in (r.gateway or "") for r in four)
    with pytest.raises(routes.RouteError, match="::/0"):
        routes.ClientRoutes("alpaca0", TUN_GW, [], ["::/0"])


def test_cleanup_is_not_fooled_by_an_ipv6_unreachable_route_on_lo():
    """The kernel shows an IPv6 unreachable route on lo: that is no other instance's tunnel."""
    lo = socket.if_nametoindex("lo")
    block = routes.Route(routes.TABLE, "::", 0, None, lo, type=routes.RTN_UNREACHABLE, family=routes.V6)
    assert not routes._other_instance([block], "alpaca0")
    tunnel = routes.Route(routes.TABLE, "::", 0, TUN_GW6, lo, family=routes.V6)
    assert routes._other_instance([tunnel], "alpaca0")


def test_read_chnroute_takes_ipv6_prefixes(tmp_path):
    path = tmp_path / "chn.txt"
    path.write_text("1.0.1.0/24\n2001:db8:0:0::5/32  # host bits cleared\n2001:db8::1\n::/0\nfe80::/10\n2001:db8::/33/1\n")
    data = chnroute.read_chnroute(path)
    assert data.prefixes == [("1.0.1.0", 24), ("2001:db8::", 32), ("2001:db8::1", 128), ("fe80::", 10)]
    assert data.bad == 2 and "line 4" in data.first_bad


def _client6(client: Client) -> None:
    """IPv6 on the stand-in TUN and the uplink, and an IPv6 default route via GW6."""
    client.ip("-6", "addr", "add", "fd00:5::16:1/64", "dev", "alpaca0", "nodad")
    client.ip("-6", "addr", "add", "2001:db8:77::10/64", "dev", "eth0", "nodad")
    client.ip("-6", "route", "add", "default", "via", GW6, "dev", "eth0")


def snapshot6(client: Client) -> str:
    """IPv6 routes and rules, without the local table (link-local addresses come and go on their own)."""
    routes6 = [line for line in client.ip("-6", "route", "show", "table", "all").splitlines(True)
               if " table local " not in line]
    return "".join(routes6) + client.ip("-6", "rule", "show")


def client_routes6_code(chn: str | None = None, **kw) -> str:
    chn_arg = f"ChnRoute(100, 'original', {chn!r})" if chn else "None"
    return (f"cr = routes.ClientRoutes('alpaca0', {TUN_GW!r}, {SERVERS + SERVERS6!r}, {LOCAL + LOCAL6!r}, "
            f"{chn_arg}, kill_switch=True, **{kw!r})\n")


@pytest.mark.root
def test_ipv6_default_into_tunnel_idempotent_and_removed_exactly(client, tmp_path):
    _client6(client)
    chn = tmp_path / "chn.txt"
    chn.write_text("2001:db8:c0::/48\n100.64.0.0/24\n")
    before, before4 = snapshot6(client), client.snapshot()
    client.py("cr.apply()\nprint('{}')", setup=client_routes6_code(str(chn), gateway6=TUN_GW6))
    once = snapshot6(client)
    out = client.py("""
        cr.apply()
        cr.apply()
        print(json.dumps({"line": cr.reapply_if_needed()}))
    """, setup=client_routes6_code(str(chn), gateway6=TUN_GW6))
    assert snapshot6(client) == once and out["line"] is None             # applying again added nothing
    assert len(ours(once)) == 3 + 2 + 1 + 1 + 1, once    # 3 rules, tunnel + kill switch, 1 server, local, chn
    route_get = lambda *a: client.ip("-6", "route", "get", *a).splitlines()[0]     # noqa: E731
    assert re.search(rf"via {TUN_GW6} dev alpaca0 table {routes.TABLE}\b", route_get("2001:db8:99::1"))
    assert f"via {GW6} dev eth0" in route_get("2001:db8:99::1", "mark", hex(routes.FWMARK))
    for dst in ("2001:db8:5::7", "2001:db8:50::1"):              # a server, local_routes: the uplink
        assert f"via {GW6} dev eth0 proto 97" in route_get(dst), dst
    assert f"via {GW6} dev eth0 table 100 proto 97" in route_get("2001:db8:c0::1")     # chnroute
    assert "via" not in route_get("2001:db8:77::1")              # the LAN, and a server on it: on-link
    assert "dev alpaca0" in route_get("fd00:5::1:1") and "via" not in route_get("fd00:5::1:1")
    client.py("cr.apply()\ncr.remove()\nprint('{}')", setup=client_routes6_code(str(chn), gateway6=TUN_GW6))
    assert snapshot6(client) == before and client.snapshot() == before4     # the exact inverse, both families


@pytest.mark.root
def test_ipv6_block_refuses_and_cleanup_after_sigkill_removes_both_families(client):
    _client6(client)
    before, before4 = snapshot6(client), client.snapshot()
    client.apply_and_kill(client_routes6_code(block_ipv6=True))
    r = client.tb.run("client", ["ping", "-6", "-n", "-c", "1", "-W", "1", "2001:db8:99::1"])
    assert r.returncode != 0 and "No route to host" in r.stdout + r.stderr, r.stdout + r.stderr
    assert client.tb.run("client", ["ping", "-6", "-n", "-c", "1", "-W", "1", "2001:db8:77::10"]).returncode == 0
    assert f"via {GW6} dev eth0" in client.ip("-6", "route", "get", "2001:db8:50::1")     # local_routes pass
    left = ours(snapshot6(client))
    assert len(left) == 2 + 1 + 1 + 1, left        # 2 rules, the block, 1 server, local_routes
    out = client.py("print(json.dumps({'removed': routes.cleanup('alpaca0'), 'again': routes.cleanup('alpaca0')}))")
    assert out["removed"] == 5 + 2 + 2 + 2 + 2 and out["again"] == 0
    assert snapshot6(client) == before and client.snapshot() == before4


@pytest.mark.root
def test_monitor_follows_the_original_ipv6_gateway(client):
    _client6(client)
    out = client.py("""
        cr.apply()
        mon, mon4 = route_monitor.RouteMonitor(ipv6=True), route_monitor.RouteMonitor()
        ip("-6", "route", "del", "default")
        ip("-6", "route", "add", "default", "via", "2001:db8:77::253", "dev", "eth0")
        out = {"readable": bool(select.select([mon], [], [], 5)[0]), "drain": mon.drain(), "drain4": mon4.drain()}
        out["line"] = cr.reapply_if_needed()
        out["own_changes_seen"] = mon.drain()
        ip("-6", "rule", "del", "pref", str(routes.PRIORITY))          # someone deletes our IPv6 tunnel rule
        select.select([mon], [], [], 5)
        out["drain2"], out["line2"] = mon.drain(), cr.reapply_if_needed()
        cr.remove()
        print(json.dumps(out))
    """, setup=client_routes6_code(gateway6=TUN_GW6))
    assert out["readable"] and out["drain"] is True and out["drain4"] is False
    assert f"original IPv6 gateway via {GW6} dev eth0 -> via 2001:db8:77::253 dev eth0" in out["line"], out["line"]
    assert "2 routes set (local_routes, server/forwarder underlay address)" in out["line"], out["line"]
    assert out["own_changes_seen"] is False
    assert out["drain2"] is True and "1 rule restored" in out["line2"], out["line2"]


@pytest.mark.root
def test_route_lookup_follows_ipv6_policy_routes(client):
    _client6(client)
    out = client.py("""
        cr.apply()
        ip("-6", "route", "add", "default", "via", "fd00:5::1:2", "dev", "alpaca0", "table", "200")
        ip("-6", "rule", "add", "to", "2001:db8:aa::/48", "lookup", "200", "pref", "1000")
        lk = route_lookup.RouteLookup("alpaca0")
        a = lambda text: socket.inet_pton(socket.AF_INET6, text)
        out = {"policy": lk.next_hop(a("2001:db8:aa::5")), "default": lk.next_hop(a("2001:db8:99::1")),
               "server": lk.next_hop(a("2001:db8:5::7")), "lan": lk.next_hop(a("2001:db8:77::9"))}
        ip("-6", "rule", "del", "pref", "1000")
        cr.remove()
        print(json.dumps(out))
    """, setup=client_routes6_code(gateway6=TUN_GW6))
    out.pop("_stderr")
    assert out == {"policy": "fd00:5::1:2", "default": TUN_GW6, "server": None, "lan": None}
