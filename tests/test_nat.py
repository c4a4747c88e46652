"""Server NAT rules (alpaca/host/nat.py) in throw-away network namespaces.

Every root test builds its own namespace(s) with alpaca.lab.testbed.Testbed and
runs alpaca.host.nat there in a child python (`tb.run(...)`), so the host's own
ruleset is never read or written. Checks use iptables-legacy(-save) inside
the namespace: python-iptables writes the legacy (x_tables) tables.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS

from alpaca.host.nat import RuleSpec, ServerNat, tag_for
from alpaca.lab import testbed

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TUN = "alp0"
NET = "10.5.0.0/16"
TAG = "alpaca-tunnel:alp0"
_count = itertools.count()


# ------------------------------------------------------------ helpers

@pytest.fixture
def tb(request):
    bed = testbed.Testbed(f"an{os.getpid() % 100000}{next(_count)}")
    request.addfinalizer(bed.close)
    bed.add_host("h", 1)
    return bed


def py(tb: testbed.Testbed, code: str, host: str = "h", env: dict | None = None, ok: bool = True):
    """Run a python snippet inside the namespace, with alpaca importable."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    r = tb.run(host, [PY, "-c", textwrap.dedent(code)], cwd=str(ROOT), env=full_env)
    if ok:
        assert r.returncode == 0, f"snippet failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def sh(tb: testbed.Testbed, cmd: str, host: str = "h") -> str:
    r = tb.run(host, ["sh", "-c", cmd])
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def save(tb: testbed.Testbed, host: str = "h") -> list[str]:
    """iptables-legacy-save without comments and counters: comparable before/after."""
    out = sh(tb, "iptables-legacy-save", host)
    lines = []
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        lines.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return lines


def rule_lines(tb: testbed.Testbed, tag: str = TAG, host: str = "h") -> list[str]:
    """The -A lines carrying exactly `tag` (quoted as iptables-save prints it)."""
    return [l for l in save(tb, host) if l.startswith("-A") and f'--comment "{tag}"' in l]


def apply_code(mtu: int = 1400, tun: str = TUN, net: str = NET, inbound: tuple = ()) -> str:
    return f"from alpaca.host.nat import ServerNat; print(ServerNat({tun!r}, {net!r}, {mtu}, {inbound!r}).apply())"


def expected(mtu: int, tun: str = TUN, tag: str = TAG, inbound: tuple = ()) -> list[str]:
    mss = mtu - 40
    return [
        f'-A POSTROUTING -s {NET} ! -d {NET} -m comment --comment "{tag}" -j MASQUERADE',
        f'-A FORWARD -i {tun} -m comment --comment "{tag}" -j ACCEPT',
        f'-A FORWARD -o {tun} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "{tag}" -j ACCEPT',
        *(f'-A FORWARD -s {n} -o {tun} -m comment --comment "{tag}" -j ACCEPT' for n in inbound),
        f'-A FORWARD -o {tun} -m comment --comment "{tag}" -j DROP',
        f'-A FORWARD -i {tun} -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment "{tag}" '
        f"-j TCPMSS --set-mss {mss}",
        f'-A FORWARD -o {tun} -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment "{tag}" '
        f"-j TCPMSS --set-mss {mss}",
    ]


TABLES_OF_EXPECTED = ["nat", "filter", "filter", "filter", "mangle", "mangle"]
N_RULES = len(TABLES_OF_EXPECTED)


def chain_rules(tb: testbed.Testbed, table: str, chain: str, host: str = "h") -> list[str]:
    return [l for l in sh(tb, f"iptables-legacy -t {table} -S {chain}", host).splitlines()
            if l.startswith("-A")]


# ------------------------------------------------------------ pure (no root needed)

def test_tag_and_rule_texts():
    assert tag_for("alp0") == TAG
    nat = ServerNat(TUN, "10.5.1.1/16", 1400)        # a host address is fine: the network is used
    specs = nat.rules()
    assert all(isinstance(s, RuleSpec) for s in specs)
    assert [(s.table, s.chain) for s in specs] == [("nat", "POSTROUTING")] + [("filter", "FORWARD")] * 3 + [
        ("mangle", "FORWARD")] * 2
    assert [s.text for s in specs] == expected(1400)
    inbound = ("192.168.1.0/24", "198.51.100.0/24")
    assert [s.text for s in ServerNat(TUN, NET, 1400, inbound).rules()] == expected(1400, inbound=inbound)
    assert str(specs[0]).startswith("-t nat -A POSTROUTING ")
    assert ServerNat(TUN, NET, 1280).mss == 1240


@pytest.mark.parametrize("args", [("bad name", NET, 1400), ("a/b", NET, 1400), ("eth+", NET, 1400),
                                  ("x" * 16, NET, 1400), (TUN, "fd00::/64", 1400), (TUN, NET, 40),
                                  (TUN, "not-a-net", 1400), (TUN, NET, 1400, ("192.168.1.1/24",)),
                                  (TUN, NET, 1400, ("2001:db8::1/64",)),
                                  (TUN, NET, 1400, (), "10.6.0.0/16")])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        ServerNat(*args)


NET6 = "fd00:5:5:5::/64"


def expected6(mtu: int, inbound: tuple = ()) -> list[str]:
    """The IPv6 rules: the same as the IPv4 ones, MSS 20 bytes smaller (the bigger IP header)."""
    return [line.replace(NET, NET6).replace(f"--set-mss {mtu - 40}", f"--set-mss {mtu - 60}")
            for line in expected(mtu, inbound=inbound)]


def test_ipv6_rule_texts():
    nat = ServerNat(TUN, NET, 1400, ("192.168.1.0/24", "2001:db8:7::/48"), NET6)
    specs = nat.rules()
    assert [s.text for s in specs if s.family == 4] == expected(1400, inbound=("192.168.1.0/24",))
    assert [s.text for s in specs if s.family == 6] == expected6(1400, inbound=("2001:db8:7::/48",))
    assert {s.command for s in specs} == {"iptables-legacy", "ip6tables-legacy"}
    # without the tunnel's IPv6 network there are no IPv6 rules, so no IPv6 exceptions either
    assert ServerNat(TUN, NET, 1400, ("2001:db8:7::/48",)).rules() == ServerNat(TUN, NET, 1400).rules()


# ------------------------------------------------------------ in a namespace

def save6(tb: testbed.Testbed, host: str = "h") -> list[str]:
    return [l for l in sh(tb, "ip6tables-legacy-save", host).splitlines() if l.startswith("-A")]


@pytest.mark.root
def test_ipv6_rules_apply_idempotently_and_clean_up_with_the_ipv4_ones(tb):
    """IPv4 and IPv6 from one process (the IPv6 side runs in a helper)."""
    code = f"""
        from alpaca.host.nat import ServerNat
        n = ServerNat("alp0", {NET!r}, 1400, ("2001:db8:7::/48",), {NET6!r})
        print(n.apply(), n.apply(), len(n.missing()))
    """
    assert py(tb, code).stdout.split() == [str(2 * N_RULES + 1), "0", "0"]
    assert sorted(save6(tb)) == sorted(expected6(1400, inbound=("2001:db8:7::/48",)))
    assert sorted(rule_lines(tb)) == sorted(expected(1400))
    r = py(tb, """
        import os, signal
        from alpaca.host.nat import cleanup
        print(cleanup("alp0"), cleanup("alp0"))
    """)
    assert r.stdout.split() == [str(2 * N_RULES + 1), "0"]
    assert save6(tb) == [] and rule_lines(tb) == []


@pytest.mark.root
@pytest.mark.parametrize("mtu,mss", [(1400, 1360), (1280, 1240)])
def test_apply_adds_exactly_the_tagged_rules(tb, mtu, mss):
    before = save(tb)
    assert py(tb, apply_code(mtu)).stdout.strip() == str(N_RULES)
    after = save(tb)
    added = [l for l in after if l not in before and not l.startswith(("*", ":", "COMMIT"))]
    assert not any(l in ("*raw", "*security") for l in after)   # tables we don't use stay unborn
    assert sorted(added) == sorted(expected(mtu))
    assert rule_lines(tb) == [l for l in after if l in expected(mtu)]
    assert sum(f"--set-mss {mss}" in l for l in added) == 2
    # the texts `alpaca-tunnel check` prints are exactly what iptables-legacy-save shows
    assert {s.text for s in ServerNat(TUN, NET, mtu).rules()} <= set(after)
    # and nothing went to the nf_tables side
    assert TAG not in sh(tb, "nft list ruleset")


@pytest.mark.root
def test_apply_is_idempotent(tb):
    assert py(tb, apply_code()).stdout.strip() == str(N_RULES)
    assert py(tb, apply_code()).stdout.strip() == "0"        # another process, e.g. a restart
    r = py(tb, """
        from alpaca.host.nat import ServerNat
        n = ServerNat("alp0", "10.5.0.0/16", 1400)
        print(n.apply(), n.apply(), len(n.missing()))
    """)
    assert r.stdout.split() == ["0", "0", "0"]
    lines = rule_lines(tb)
    assert sorted(lines) == sorted(expected(1400))            # one copy each


@pytest.mark.root
def test_apply_after_mtu_change_replaces_the_stale_clamp(tb):
    py(tb, apply_code(1400))
    assert py(tb, apply_code(1280)).stdout.strip() == "2"     # only the two TCPMSS rules change
    assert sorted(rule_lines(tb)) == sorted(expected(1280))


@pytest.mark.root
def test_remove_restores_the_tables(tb):
    # some unrelated rules the host already had
    sh(tb, "iptables-legacy -A FORWARD -s 192.0.2.0/24 -j DROP;"
           "iptables-legacy -t nat -A POSTROUTING -o eth0 -j MASQUERADE;"
           "iptables-legacy -t mangle -A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1000")
    before = save(tb)
    r = py(tb, """
        from alpaca.host.nat import ServerNat
        n = ServerNat("alp0", "10.5.0.0/16", 1400)
        print(n.apply(), n.remove(), n.remove(), len(n.missing()))
    """)
    assert r.stdout.split() == [str(N_RULES), str(N_RULES), "0", str(N_RULES)]
    assert save(tb) == before


@pytest.mark.root
def test_cleanup_after_sigkill_removes_exactly_our_leftovers(tb):
    # an identical rule without the comment, and rules of other instances
    # (alp01 has our name as a prefix: the match must be exact)
    for table, line in zip(TABLES_OF_EXPECTED, expected(1400)):
        untagged = line.replace(f' -m comment --comment "{TAG}"', "")
        sh(tb, f"iptables-legacy -t {table} {untagged}")
    py(tb, apply_code(1400, tun="alp01", net="10.6.0.0/16"))
    sh(tb, "iptables-legacy -A FORWARD -i alp -m comment --comment alpaca-tunnel:alp -j ACCEPT")
    before = save(tb)

    # the "daemon": applies, then dies without removing anything
    r = py(tb, """
        import os, signal
        from alpaca.host.nat import ServerNat
        ServerNat("alp0", "10.5.0.0/16", 1400).apply()
        os.kill(os.getpid(), signal.SIGKILL)
    """, ok=False)
    assert r.returncode == -9
    assert sorted(rule_lines(tb)) == sorted(expected(1400))

    # the next start / `alpaca-tunnel cleanup`, a fresh process
    assert py(tb, "from alpaca.host.nat import cleanup; print(cleanup('alp0'))").stdout.strip() == str(N_RULES)
    assert save(tb) == before
    assert len(rule_lines(tb, "alpaca-tunnel:alp01")) == N_RULES
    assert len(rule_lines(tb, "alpaca-tunnel:alp")) == 1
    assert py(tb, "from alpaca.host.nat import cleanup; print(cleanup('alp0'))").stdout.strip() == "0"


@pytest.mark.root
def test_our_filter_rules_come_after_the_administrators_on_a_docker_style_forward_chain(tb):
    """MASQUERADE and TCPMSS first (they neither accept nor drop); the
    filter block after DOCKER-USER, before the catch-all DROP."""
    sh(tb, "iptables-legacy -P FORWARD DROP;"
           "iptables-legacy -N DOCKER-USER; iptables-legacy -A DOCKER-USER -j RETURN;"
           "iptables-legacy -A FORWARD -j DOCKER-USER;"
           "iptables-legacy -A FORWARD -j DROP;"
           "iptables-legacy -t nat -A POSTROUTING -j RETURN;"
           "iptables-legacy -t mangle -A FORWARD -j RETURN")
    py(tb, apply_code())
    exp = expected(1400)
    assert chain_rules(tb, "filter", "FORWARD") == ["-A FORWARD -j DOCKER-USER", *exp[1:4], "-A FORWARD -j DROP"]
    assert chain_rules(tb, "nat", "POSTROUTING")[0] == exp[0]
    assert chain_rules(tb, "mangle", "FORWARD")[:2] == exp[4:6]
    # a restart keeps the block where it is; a block out of order is put back whole
    assert py(tb, apply_code()).stdout.strip() == "0"
    sh(tb, "iptables-legacy -D FORWARD 2")
    assert py(tb, apply_code()).stdout.strip() == "3"
    assert chain_rules(tb, "filter", "FORWARD") == ["-A FORWARD -j DOCKER-USER", *exp[1:4], "-A FORWARD -j DROP"]
    assert "-P FORWARD DROP" in sh(tb, "iptables-legacy -S FORWARD")
    py(tb, "from alpaca.host.nat import cleanup; cleanup('alp0')")
    assert "-P FORWARD DROP" in sh(tb, "iptables-legacy -S FORWARD")   # policy untouched


@pytest.mark.root
def test_xtables_lock_held_gives_one_readable_error(tb, tmp_path):
    lock = tmp_path / "xtables.lock"                       # private lock file: the host's stays free
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = py(tb, """
            import alpaca.host.nat as nat
            nat.LOCK_WAIT = 0.3
            try:
                nat.ServerNat("alp0", "10.5.0.0/16", 1400).apply()
            except nat.NatError as e:
                print("NatError:", e)
        """, env={"XTABLES_LOCKFILE": str(lock)})
    finally:
        os.close(fd)
    out = r.stdout.strip()
    assert out.startswith("NatError:") and "xtables lock" in out and "\n" not in out, out
    assert rule_lines(tb) == []


@pytest.mark.root
def test_iptc_errors_become_one_line_nat_errors(tb):
    r = py(tb, """
        import alpaca.host.nat as nat
        nat.TABLES = ("no_such_table",)      # iptc_init fails, nothing is changed
        try:
            nat.cleanup("alp0")
        except nat.NatError as e:
            print("NatError:", e)
    """)
    out = r.stdout.strip()
    assert out.startswith("NatError:") and "no_such_table" in out and "\n" not in out, out


# ------------------------------------------------------------ real traffic

def _gateway(tb: testbed.Testbed) -> None:
    """c --(veth; "alp0" stands in for the TUN)--> r --(bridge)--> x.

    c has only a tunnel address and routes everything via r; x has no route
    back to the tunnel network, so replies only come back if r masquerades.
    """
    tb.add_host("r", 1)
    tb.add_host("x", 2)
    c = tb.ns("c")
    tb._make_ns(c)
    outer, inner = f"{tb.prefix}a", f"{tb.prefix}b"
    with IPRoute() as ipr:
        ipr.link("add", ifname=outer, kind="veth", peer={"ifname": inner, "net_ns_fd": c})
        ipr.link("set", index=ipr.link_lookup(ifname=outer)[0], net_ns_fd=tb.ns("r"))
    with NetNS(tb.ns("r")) as ns:
        i = ns.link_lookup(ifname=outer)[0]
        ns.link("set", index=i, ifname=TUN)
        ns.addr("add", index=i, address="10.5.0.1", prefixlen=16)
        ns.link("set", index=i, state="up")
    with NetNS(c) as ns:
        i = ns.link_lookup(ifname=inner)[0]
        ns.link("set", index=i, ifname="eth0")
        ns.addr("add", index=i, address="10.5.0.2", prefixlen=16)
        ns.link("set", index=i, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway="10.5.0.1")
    # per-namespace sysctls (the host's are not touched); no TCP timestamps
    # so the MSS seen by the sockets is exactly the clamped value
    sh(tb, "echo 1 > /proc/sys/net/ipv4/ip_forward", "r")
    for host in ("c", "x"):
        sh(tb, "echo 0 > /proc/sys/net/ipv4/tcp_timestamps", host)
    sh(tb, "iptables-legacy -P FORWARD DROP", "r")


def _pings(tb: testbed.Testbed) -> bool:
    return tb.run("c", ["ping", "-c1", "-W1", "-q", "172.31.77.2"]).returncode == 0


def _mss_both_ways(tb: testbed.Testbed) -> tuple[int, int]:
    """TCP_MAXSEG of a connection c -> x, seen at (c, x)."""
    import subprocess
    server = tb.popen("x", [PY, "-c", textwrap.dedent("""
        import socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 5001)); s.listen(1); print("ready", flush=True)
        s.settimeout(10); conn, _ = s.accept()
        print(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
        conn.recv(1)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        r = tb.run("c", [PY, "-c", textwrap.dedent("""
            import socket
            s = socket.create_connection(("172.31.77.2", 5001), timeout=5)
            print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)); s.close()
        """)])
        assert r.returncode == 0, r.stderr
        at_x = int(server.stdout.readline())
        server.wait(5)
        return int(r.stdout), at_x
    finally:
        tb.stop(server)


@pytest.mark.root
def test_gateway_forwards_masquerades_and_clamps(tb):
    _gateway(tb)
    assert not _pings(tb)                                   # FORWARD policy DROP, no NAT
    assert py(tb, apply_code(1400), host="r").stdout.strip() == str(N_RULES)
    assert _pings(tb)
    assert _mss_both_ways(tb) == (1360, 1360)
    sh(tb, "iptables-legacy -t mangle -F FORWARD", "r")      # without the clamp: veth MTU 1500 - 40
    assert _mss_both_ways(tb) == (1460, 1460)
    assert py(tb, "from alpaca.host.nat import cleanup; print(cleanup('alp0'))", host="r").stdout.strip() == "4"
    assert not _pings(tb)


@pytest.mark.root
def test_nft_drop_still_drops_what_legacy_accepts(tb):
    """docs/operations.md (iptables-legacy vs nf_tables): ACCEPT in the legacy tables does not skip nf_tables chains."""
    _gateway(tb)
    py(tb, apply_code(1400), host="r")
    assert _pings(tb)
    # what Docker on the nft backend does: iptables(-nft) -P FORWARD DROP
    sh(tb, "iptables -P FORWARD DROP", "r")
    assert not _pings(tb)
    assert TAG not in sh(tb, "iptables -S; iptables -t nat -S; nft list ruleset", "r")
    assert TAG in sh(tb, "iptables-legacy -t nat -S", "r")
    sh(tb, "iptables -P FORWARD ACCEPT", "r")
    assert _pings(tb)


def _x_routes_the_tunnel_via_r(tb: testbed.Testbed) -> None:
    """x (outside) sends the tunnel network to r, as a LAN host would."""
    with NetNS(tb.ns("x")) as ns:
        ns.route("add", dst=NET, gateway=tb.hosts["r"])


def _x_pings_c(tb: testbed.Testbed) -> bool:
    return tb.run("x", ["ping", "-c1", "-W1", "-q", "10.5.0.2"]).returncode == 0


@pytest.mark.root
def test_outside_hosts_cannot_open_connections_into_the_tunnel(tb):
    """The server lets the clients out and their replies back, but a LAN host
    routing the tunnel network via it reaches no client, whatever the FORWARD
    policy, unless `allow_inbound_from` names its network."""
    _gateway(tb)
    _x_routes_the_tunnel_via_r(tb)
    for policy in ("DROP", "ACCEPT"):
        sh(tb, f"iptables-legacy -P FORWARD {policy}", "r")
        py(tb, apply_code(1400), host="r")
        assert _pings(tb)                                    # out, and the replies back in
        assert not _x_pings_c(tb), policy                    # but nothing new in
        drops = [l for l in sh(tb, "iptables-legacy -v -x -n -L FORWARD", "r").splitlines() if "DROP" in l
                 and "alp0" in l]
        assert drops and int(drops[0].split()[0]) >= 1       # counted by our DROP
        py(tb, "from alpaca.host.nat import cleanup; cleanup('alp0')", host="r")
    py(tb, apply_code(1400, inbound=("172.31.77.0/24",)), host="r")      # x's network
    assert _x_pings_c(tb) and _pings(tb)


@pytest.mark.root
def test_an_administrators_drop_in_forward_still_wins(tb):
    """An administrator's rule in FORWARD at start comes before ours: their
    DROP of tunnel traffic holds (FORWARD policy DROP, as on a Docker host)."""
    _gateway(tb)
    sh(tb, "iptables-legacy -A FORWARD -i alp0 -d 172.31.77.2 -j DROP", "r")
    py(tb, apply_code(1400), host="r")
    assert chain_rules(tb, "filter", "FORWARD", "r")[0] == "-A FORWARD -d 172.31.77.2/32 -i alp0 -j DROP"
    assert not _pings(tb)
    sh(tb, "iptables-legacy -D FORWARD -i alp0 -d 172.31.77.2 -j DROP", "r")
    assert _pings(tb)
