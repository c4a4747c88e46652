"""Tier 3: the security claims of docs/security.md, proved with real daemons.

World (module fixture `sec`), every host a namespace on one bridge:

    s1   server 1.1, the clients' gateway        s2   server 1.2
    c1   client 16.1 = X: gateway 1.1, forwarders [1.2], so everything X
         sends goes to 1.2, which relays what is for 1.1 (1.1 sees one copy)
    c2   client 16.2 = M: a real member (gateway 1.1, no forwarders) and the
         attacker. M knows the group name and its own key string; its
         secrets.txt lists the servers with `null` keys. Since 16.2 > 16.1, M
         holds key(16.1, 16.2) but no key of a pair (X, victim).
    c3   client 16.3, and c3b a second daemon with the same ID 16.3: the
         subjects of the nonce tests (started by those tests)
    eve  an outsider host without a daemon (replays from another address)

Servers know every peer's key string. Datagrams are captured with
tools/sniff_datagrams.py (it splits UDP GSO
trains), re-sent with tools/send_udp.py, forged with tools/forge_udp.py
(imports alpaca.protocol.crypto), and read here with the group key
(alpaca.protocol.crypto.peek), as any group member could. IPv6 is off in
every namespace, so TUN counters count exactly the tunnel's IPv4 packets.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from alpaca.host.control import ControlError, query
from alpaca.protocol.constants import KIND_DATA, REPLAY_WINDOW
from alpaca.protocol.crypto import derive_group_key
from alpaca.protocol.wire import peek
from alpaca.protocol.ids import parse_id
from alpaca.lab.daemons import PY, Mesh
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for

pytestmark = pytest.mark.root
TOOLS = Path(__file__).parent / "tools"
GROUP = "test"
GROUP_KEY = derive_group_key(GROUP)
PORT = 1040
X, M, N = "16.1", "16.2", "16.3"
FAKETIME_GLOB = "/usr/lib/*/faketime/libfaketime.so.1"      # Debian package libfaketime


# ---------------------------------------------------------------- helpers

def status(peer) -> dict:
    """The daemon's status, straight from its control socket (no CLI process)."""
    return query(peer.control_socket, {"command": "status"})


def peer_of(st: dict, peer_id: str) -> dict:
    return next(p for p in st["peers"] if p["id"] == peer_id)


def tun_rx(tb: Testbed, host: str) -> int:
    """Packets the daemon wrote into its TUN device (the kernel counts them as received)."""
    return tb.link_stats(host, "alpaca")["rx_packets"]


def frozen(p: dict) -> dict:
    """Everything about a peer that must not move, without the ages."""
    return {"up": p["up"], "rx": (p["rx_packets"], p["rx_bytes"]), "tx": (p["tx_packets"], p["tx_bytes"]),
            "relayed": p["relayed_packets"], "drops": p["drops"],
            "paths": sorted((q["address"], q["learned"]) for q in p["paths"])}


def start(peer, env: dict | None = None) -> None:
    """Start (or restart) a daemon, optionally with another environment (libfaketime)."""
    peer.control_socket.unlink(missing_ok=True)       # a SIGKILLed daemon leaves its socket
    peer.start(env=env)


def stop(peer, sig: int = signal.SIGTERM) -> None:
    if peer.proc is not None:
        peer.stop(sig)


def wait_ready(peer, timeout: float = 10) -> None:
    def ready():
        try:
            return status(peer)
        except ControlError:
            return None
    assert wait_for(ready, timeout, 0.02), f"{peer.name} did not start:\n{peer.log_text()[-3000:]}"


def ping(peer, address: str, count: int, interval: float = 0.05):
    r = peer.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", address], timeout=60)
    received = int(re.search(r"(\d+) received", r.stdout).group(1)) if "received" in r.stdout else 0
    return r, received


class Sniffer:
    """tools/sniff_datagrams.py in a namespace, writing to a file (no pipe to
    fill up). It splits the daemon's UDP GSO trains
    into their datagrams."""

    def __init__(self, mesh, host: str, source_ip: str, count: int, timeout: float, name: str):
        self.path, self.err = mesh.workdir / f"{name}.hex", mesh.workdir / f"{name}.err"
        with open(self.path, "w") as out, open(self.err, "w") as err:
            self.proc = mesh.tb.popen(host, [PY, str(TOOLS / "sniff_datagrams.py"), "eth0", str(PORT), str(count),
                                             str(timeout), source_ip], stdout=out, stderr=err)
        self.timeout = timeout
        assert wait_for(lambda: self.path.read_text().startswith("ready"), 10), self.err.read_text()

    def datagrams(self, stop: bool = False) -> list[bytes]:
        if stop:
            time.sleep(0.3)                   # the last datagrams in flight
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(self.timeout + 10) == 0, self.err.read_text()
        return [bytes.fromhex(x) for x in self.path.read_text().split()[1:]]


def header(datagram: bytes):
    return peek(GROUP_KEY, datagram)[0]


def forge(mesh, batches: list[dict], pace: float = 0.0003, wait: bool = True):
    """Run the attacker M's tools/forge_udp.py in M's namespace."""
    job = json.dumps({"group": GROUP, "me": M, "my_key": mesh.keys[M], "pace": pace, "batches": batches})
    if not wait:
        proc = mesh.tb.popen("c2", [PY, str(TOOLS / "forge_udp.py")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        proc.stdin.write(job)
        proc.stdin.close()
        return proc
    r = mesh.tb.run("c2", [PY, str(TOOLS / "forge_udp.py")], input=job, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["sent"]


def send(mesh, host: str, datagrams: list[bytes], to_host: str) -> None:
    """tools/send_udp.py: re-send captured datagrams from `host` to `to_host`'s daemon."""
    r = mesh.tb.run(host, [PY, str(TOOLS / "send_udp.py"), mesh.ip[to_host], str(PORT)],
                    input="\n".join(d.hex() for d in datagrams), timeout=30)
    assert r.returncode == 0, r.stderr


UDP_GLOBAL = ("malformed", "wrong_version", "unknown_peer", "auth_failure")   # not_routable comes from the TUN side


def udp_drops(st: dict) -> dict:
    """Global drops of unauthenticated UDP input."""
    return {k: v for k, v in st["drops"].items() if k in UDP_GLOBAL}


def delta(after: dict, before: dict) -> dict:
    keys = set(after) | set(before)
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}


def but_copies(drops: dict) -> dict:
    """Drops other than `duplicate`: a daemon's loss reports go in copies
    (docs/protocol.md §12), each further copy a `duplicate` at the peer."""
    return {k: v for k, v in drops.items() if k != "duplicate"}


def settle(fn, expected, timeout: float = 10):
    """Wait until fn() == expected (the daemon has worked through its socket
    buffer), then check that it stays there."""
    wait_for(lambda: fn() == expected, timeout, 0.05)
    time.sleep(0.3)
    return fn()


# ---------------------------------------------------------------- the world

@pytest.fixture(scope="module")
def sec(tmp_path_factory):
    tb = Testbed(unique_prefix())
    mesh = Mesh(tb, tmp_path_factory.mktemp("security"))
    try:
        for name, number in (("s1", 1), ("s2", 2), ("c1", 16), ("c2", 17), ("c3", 18), ("c3b", 19), ("eve", 66)):
            tb.add_host(name, number)
        ip = mesh.ip
        for name in mesh.ip:
            # no IPv6 on the TUN devices: the kernel's router solicitations and
            # MLD reports would be carried to 1.1 and spoil the exact TUN counts
            for key in ("all", "default"):
                tb.run(name, ["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"], check=True)
        servers_full = [mesh.line("1.1", ip["s1"]), mesh.line("1.2", ip["s2"])]
        servers_null = [f"1.1 null {ip['s1']} null {PORT}", f"1.2 null {ip['s2']} null {PORT}"]
        everyone = servers_full + [mesh.line(i, None) for i in (X, M, N)]
        mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, everyone)
        mesh.add("s2", 2, {"id": "1.2", "mode": "server"}, everyone)
        mesh.add("c1", 16, {"id": X, "mode": "client", "gateway": "1.1", "forwarders": ["1.2"]},
                 servers_null + [mesh.line(X, None)])
        mesh.add("c2", 17, {"id": M, "mode": "client", "gateway": "1.1"}, servers_null + [mesh.line(M, None)])
        for name, number in (("c3", 18), ("c3b", 19)):          # the same ID twice
            mesh.add(name, number, {"id": N, "mode": "client", "gateway": "1.1"}, servers_null + [mesh.line(N, None)])
        for name in ("s1", "s2", "c1", "c2"):
            start(mesh.peers[name])
        for name in ("s1", "s2", "c1", "c2"):
            wait_ready(mesh.peers[name])
        s1, s2 = mesh.peers["s1"], mesh.peers["s2"]
        assert wait_for(lambda: all(peer_of(status(s1), i)["up"] for i in (X, M))
                        and peer_of(status(s2), X)["up"], 15), (status(s1), status(s2))
        assert wait_for(lambda: ping(mesh.peers["c1"], "10.17.1.1", 1)[1] == 1, 10)
        yield mesh
    finally:
        mesh.close()


# ---------------------------------------------------------------- forgery and impersonation

FORGERY_KEYS = ("own:1.1", "own:1.2", "own:16.1", "guess", "group")


def test_member_cannot_forge_a_datagram_from_another_member(sec):
    """M (16.2) seals datagrams claiming src=16.1 under every key it can get:
    its own pair keys with 1.1 and 1.2, key(16.1, 16.2) (which it does hold),
    a guessed key, the group key. Sent to 1.1 directly, to 1.1 through relay
    1.2, and to 1.2, with X's real session and the very (ts, seq) X will use
    next. Nothing reaches a TUN, X's status at 1.1 and 1.2 does not move
    (paths, rx, drops, last_rx), only the global auth_failure counter does;
    and X's next real datagrams, which carry the forged nonces, all get in."""
    mesh, tb, ip = sec, sec.tb, sec.ip
    s1, x = mesh.peers["s1"], mesh.peers["c1"]

    # M learns X's session the way an on-path member could: one of X's
    # datagrams, captured at 1.2 and unmasked with the group key
    sniff = Sniffer(mesh, "s2", ip["c1"], 1, 10, "x-session")
    assert ping(x, "10.17.1.1", 3)[1] == 3
    seen = header(sniff.datagrams()[0])
    assert seen.src == parse_id(X)
    x_session = seen.session.hex()

    x.proc.send_signal(signal.SIGSTOP)        # X falls silent: any change now is M's doing
    try:
        time.sleep(0.5)
        before = {h: status(mesh.peers[h]) for h in ("s1", "s2")}
        tun_before = {h: tun_rx(tb, h) for h in ("s1", "s2")}
        t0 = time.time()
        now = int(t0)
        batches = []
        for key in FORGERY_KEYS:
            for host, dst in (("s1", "1.1"), ("s2", "1.1"), ("s2", "1.2")):
                common = {"to": [ip[host], PORT], "src": X, "dst": dst, "key": key}
                # X's own session, every (ts, seq) it is about to use: data, direct ...
                batches.append({**common, "sessions": [x_session], "ts": list(range(now - 1, now + 6)),
                                "seq": [0, 12], "kind": KIND_DATA, "path": 0})
                # ... and keepalives marked as relayed (would teach a relayed path)
                batches.append({**common, "sessions": [x_session], "ts": list(range(now - 1, now + 6)),
                                "seq": [12, 24], "kind": 1, "path": 1})
                # new sessions (would take X's session slots)
                batches.append({**common, "sessions": 10, "ts": [now], "seq": [0, 2], "kind": KIND_DATA})
        per_batch = 7 * 12 + 7 * 12 + 10 * 2
        expected = {"s1": len(FORGERY_KEYS) * per_batch, "s2": 2 * len(FORGERY_KEYS) * per_batch}
        assert forge(mesh, batches) == sum(expected.values())

        for h in ("s1", "s2"):
            got = settle(lambda h=h: delta(udp_drops(status(mesh.peers[h])), udp_drops(before[h])),
                         {"auth_failure": expected[h]})
            assert got == {"auth_failure": expected[h]}, (h, got)      # global drops only
        elapsed = time.time() - t0
        for h in ("s1", "s2"):
            after = status(mesh.peers[h])
            assert tun_rx(tb, h) == tun_before[h], h                  # nothing written to TUN
            b, a = peer_of(before[h], X), peer_of(after, X)
            assert frozen(a) == frozen(b), (h, b, a)                  # paths, rx, drops, up ...
            assert a["last_rx_age"] >= b["last_rx_age"] + elapsed - 0.5, (h, b, a, elapsed)
            for path_b, path_a in zip(b["paths"], a["paths"]):
                assert path_a["last_rx_age"] >= path_b["last_rx_age"] + elapsed - 0.5, (h, b, a)
            assert not any(p["address"].startswith(ip["c2"] + ":") for p in a["paths"])

        # control: the same tool with X's real key string (which M does not
        # have) is authenticated: an old timestamp lands on X as `replay`
        mid = status(s1)
        assert forge(mesh, [{"to": [ip["s1"], PORT], "src": X, "dst": "1.1", "key": f"psk:{mesh.keys[X]}",
                             "sessions": 1, "ts": [now - 60], "seq": [0, 1]}]) == 1
        got = settle(lambda: delta(peer_of(status(s1), X)["drops"], peer_of(mid, X)["drops"]), {"replay": 1})
        assert got == {"replay": 1}
        assert udp_drops(status(s1)) == udp_drops(mid)
    finally:
        x.proc.send_signal(signal.SIGCONT)

    # X's next datagrams carry nonces M forged above: all are delivered, none
    # counted as a duplicate (the forgeries never entered X's window)
    sniff = Sniffer(mesh, "s2", ip["c1"], 1000, 10, "x-after")
    r, received = ping(x, "10.17.1.1", 10, 0.1)
    captured = sniff.datagrams(stop=True)
    assert received == 10, r.stdout
    forged = {(x_session, ts, seq) for ts in range(now - 1, now + 6) for seq in range(24)}
    reused = [h for h in map(header, captured) if (h.session.hex(), h.ts, h.seq) in forged]
    assert len(reused) >= 5, [(h.ts, h.seq) for h in map(header, captured)]
    for h, extra in (("s1", {"replay": 1}), ("s2", {})):
        drops = peer_of(status(mesh.peers[h]), X)["drops"]
        # (X's loss reports go in copies, each further copy a `duplicate`;
        # that all 10 pings, which reused forged nonces, were delivered is
        # what shows the forgeries never entered X's window)
        assert but_copies(delta(drops, peer_of(before[h], X)["drops"])) == extra, (h, drops)
    print(f"\nforgery: {sum(expected.values())} forged datagrams -> auth_failure {expected}; "
          f"X then reused {len(reused)} forged nonces, all delivered")


def test_member_holding_a_pair_key_with_x_teaches_no_path_for_x(sec):
    """M holds key(16.1, 16.2) (16.2 is the bigger ID), so it can seal
    src=16.1, dst=16.2 datagrams that authenticate. Flooded at the relays 1.1
    and 1.2 (many sessions, X's own session too) while X pings 1.1 through
    relay 1.2: no relay learns a path for X from them, nothing reaches a
    TUN, and X's traffic keeps 0 % loss (windows are per (src, dst))."""
    mesh, tb, ip = sec, sec.tb, sec.ip
    x = mesh.peers["c1"]
    sniff = Sniffer(mesh, "s2", ip["c1"], 1, 10, "x-session2")
    assert ping(x, "10.17.1.1", 2)[1] == 2
    x_session = header(sniff.datagrams()[0]).session.hex()
    time.sleep(0.3)
    before = {h: status(mesh.peers[h]) for h in ("s1", "s2")}
    tun_before = {h: tun_rx(tb, h) for h in ("s1", "s2")}
    now = int(time.time())
    batches = []
    for host in ("s1", "s2"):
        common = {"to": [ip[host], PORT], "src": X, "dst": M, "key": f"own:{X}", "ts": list(range(now, now + 4))}
        batches.append({**common, "sessions": [x_session] + [os.urandom(8).hex() for _ in range(20)],
                        "seq": [0, 16], "kind": KIND_DATA, "path": 0})
        batches.append({**common, "sessions": [x_session], "seq": [100, 140], "kind": 1, "path": 1})
    attacker = forge(mesh, batches, pace=0.0006, wait=False)
    time.sleep(0.2)
    ping_began = time.time()
    r, received = ping(x, "10.17.1.1", 30, 0.05)
    ping_ended = time.time()
    flood = json.loads(attacker.stdout.read())
    attacker.wait(30)
    assert received == 30 and "DUP!" not in r.stdout, r.stdout
    assert flood["sent"] == 2 * (21 * 4 * 16 + 4 * 40)
    overlap = min(ping_ended, flood["ended"]) - max(ping_began, flood["began"])
    assert overlap >= 1.0, (flood, ping_began, ping_ended)          # the ping ran during the flood
    time.sleep(0.5)
    for h in ("s1", "s2"):
        b, a = peer_of(before[h], X), peer_of(status(mesh.peers[h]), X)
        assert frozen(a)["paths"] == frozen(b)["paths"], (h, b["paths"], a["paths"])   # no path learned
        # X's 30 pings and its keepalives and loss reports, not one of the 3,008 forgeries
        assert a["rx_packets"] - b["rx_packets"] <= (30 + 8 if h == "s1" else 8), (h, a)
        changed = delta(a["drops"], b["drops"])
        # (`duplicate`: the further copies of X's loss reports)
        assert set(changed) <= {"too_many_sessions", "no_path", "duplicate"}, (h, changed)
        # the forgeries did authenticate: 1.1 relayed them down to M, 1.2
        # (which has no path to M) counted them as no_path; both on X
        moved = a["relayed_packets"] - b["relayed_packets"] if h == "s1" else changed.get("no_path", 0)
        assert moved > 500, (h, a)
        print(f"\n{h}: X rx +{a['rx_packets'] - b['rx_packets']}, relayed "
              f"+{a['relayed_packets'] - b['relayed_packets']}, drops on X {changed}")
    assert tun_rx(tb, "s1") - tun_before["s1"] == 30          # X's echo requests, nothing else
    assert tun_rx(tb, "s2") == tun_before["s2"]


def test_member_cannot_spoof_another_members_tunnel_address(sec):
    """M seals datagrams with its own key (src=16.2, so they authenticate) whose
    inner packet claims X's tunnel address 10.17.16.1 as its source. 1.1 should
    refuse them: a packet from 10.17.16.1 must come from 16.1's key."""
    mesh, tb, ip = sec, sec.tb, sec.ip
    s1 = mesh.peers["s1"]
    now = int(time.time())
    spoof = {"to": [ip["s1"], PORT], "src": M, "dst": "1.1", "key": "own:1.1", "sessions": 1, "ts": [now],
             "seq": [0, 5]}
    # control: the same datagrams with M's own address as inner source get in
    before = tun_rx(tb, "s1")
    forge(mesh, [spoof])
    if settle(lambda: tun_rx(tb, "s1") - before, 5) != 5:
        raise RuntimeError("the control did not get in: the test itself is broken")
    before, x_before = tun_rx(tb, "s1"), tun_rx(tb, "c1")
    m_before = peer_of(status(s1), M)["drops"]
    forge(mesh, [{**spoof, "inner_src": X}])
    time.sleep(0.5)
    written, answered = tun_rx(tb, "s1") - before, tun_rx(tb, "c1") - x_before
    print(f"\nspoofed inner source 10.17.16.1 from M: {written} of 5 written to 1.1's TUN, "
          f"{answered} echo replies delivered to X")
    assert written == 0, f"{written} packets from 10.17.16.1 sealed by 16.2 reached 1.1's TUN"
    assert but_copies(delta(peer_of(status(s1), M)["drops"], m_before)) == {"spoofed": 5}
    # nor for a host outside the tunnel net (the internet, the server's LAN):
    # M has no networks configured, so only its own tunnel address will do
    before, m_before = tun_rx(tb, "s1"), peer_of(status(s1), M)["drops"]
    forge(mesh, [{**spoof, "inner_src_ip": "203.0.113.5", "ts": [int(time.time())]}])
    time.sleep(0.5)
    assert tun_rx(tb, "s1") == before
    assert but_copies(delta(peer_of(status(s1), M)["drops"], m_before)) == {"spoofed": 5}


# ---------------------------------------------------------------- replay

def test_replays_are_never_delivered_twice(sec):
    """Datagrams of 16.2 to 1.1, captured at 1.1, re-sent: immediately from
    the capturing namespace, through forwarder 1.2 (which never saw them, so
    relays them once; 1.1 refuses), after 1 s from another address (eve), and
    after the window. Exact counts: every replay is one duplicate or replay
    drop, nothing reaches a TUN, no path is learned."""
    mesh, tb, ip = sec, sec.tb, sec.ip
    s1, s2, m = mesh.peers["s1"], mesh.peers["s2"], mesh.peers["c2"]
    # a tunnel that has carried data knows its path is clean: one datagram per
    # ping (before 1.1's first report, each would go with parity for the prior)
    assert wait_for(lambda: ping(m, "10.17.1.1", 1)[1] == 1 and peer_of(status(m), "1.1")["copies"] == 0, 10)
    sniff = Sniffer(mesh, "s1", ip["c2"], 32, 10, "replay")
    r, received = ping(m, "10.17.1.1", 8, 0.05)
    assert received == 8, r.stdout
    # the 8 echo requests (a keepalive, its probe or a loss report may go by too)
    captured = [d for d in sniff.datagrams(stop=True) if header(d).kind == KIND_DATA]
    k = len(captured)
    assert k == 8
    heads = [header(d) for d in captured]
    assert all((h.src, h.dst) == (parse_id(M), parse_id("1.1")) for h in heads)
    newest = max(h.ts for h in heads)
    time.sleep(0.3)
    tun0 = {h: tun_rx(tb, h) for h in ("s1", "s2")}
    m_at = lambda peer: peer_of(status(peer), M)
    b1, b2 = m_at(s1), m_at(s2)

    def drops1():
        return delta(m_at(s1)["drops"], b1["drops"])

    def drops2():
        return delta(m_at(s2)["drops"], b2["drops"])

    # 1. immediately, from the capturing namespace (1.1 itself)
    send(mesh, "s1", captured, "s1")
    assert settle(drops1, {"duplicate": k}) == {"duplicate": k}
    # 2. through a forwarder: 1.2 has not seen them, relays each once; 1.1 refuses
    send(mesh, "s1", captured, "s2")
    assert settle(drops1, {"duplicate": 2 * k}) == {"duplicate": 2 * k}
    assert m_at(s2)["relayed_packets"] - b2["relayed_packets"] == k
    # 3. after 1 s, from another address (an outsider), straight and through 1.2
    time.sleep(1.0)
    send(mesh, "eve", captured, "s1")
    send(mesh, "eve", captured, "s2")
    assert settle(drops1, {"duplicate": 3 * k}) == {"duplicate": 3 * k}
    assert settle(drops2, {"duplicate": k}) == {"duplicate": k}      # 1.2 relays nothing twice
    # 4. after the window: too old everywhere
    wait_for(lambda: int(time.time()) > newest + REPLAY_WINDOW, REPLAY_WINDOW + 3, 0.1)
    send(mesh, "eve", captured, "s1")
    send(mesh, "c2", captured, "s1")
    send(mesh, "eve", captured, "s2")
    assert settle(drops1, {"duplicate": 3 * k, "replay": 2 * k}) == {"duplicate": 3 * k, "replay": 2 * k}
    assert settle(drops2, {"duplicate": k, "replay": k}) == {"duplicate": k, "replay": k}

    assert {h: tun_rx(tb, h) for h in ("s1", "s2")} == tun0          # never delivered twice
    a1, a2 = m_at(s1), m_at(s2)
    assert a2["relayed_packets"] - b2["relayed_packets"] == k          # relayed once, ever
    assert a1["rx_packets"] - b1["rx_packets"] <= 4                    # M's own keepalives only
    assert frozen(a1)["paths"] == frozen(b1)["paths"]                  # a replay teaches no path
    assert frozen(a2)["paths"] == frozen(b2)["paths"]
    assert ping(m, "10.17.1.1", 3)[1] == 3


# ---------------------------------------------------------------- nonce uniqueness

def nonce(h) -> tuple:
    """The AEAD nonce of a datagram: header bytes 4..24 (src, dst, session, ts, seq)."""
    return (h.src, h.dst, h.session, h.ts, h.seq)


def distinct_datagrams(captured: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
    """Each capture without repeats, after checking that no nonce sealed two
    different datagrams in any of them. A loss report goes out in copies of
    one datagram (same bytes, same nonce): a copy, not a reuse."""
    by_nonce: dict[tuple, bytes] = {}
    for d in (d for ds in captured.values() for d in ds):
        assert by_nonce.setdefault(nonce(header(d)), d) == d, "a nonce sealed two different datagrams"
    return {name: list(dict.fromkeys(ds)) for name, ds in captured.items()}


def runs(heads: list) -> list[list]:
    """Split captured headers (in arrival order) into runs of one session each."""
    out: list[list] = []
    for h in heads:
        if not out or out[-1][0].session != h.session:
            out.append([])
        out[-1].append(h)
    return out


def shared_counters(a: list, b: list) -> int:
    """(dst, ts, seq) used by both runs: only the session keeps their nonces apart."""
    return len({(h.dst, h.ts, h.seq) for h in a} & {(h.dst, h.ts, h.seq) for h in b})


def flood(mesh, host: str, seconds: float, rate: int = 100):
    return mesh.tb.popen(host, [PY, str(TOOLS / "nonce_traffic.py"), "10.17.1.1", "9", str(rate), str(seconds)],
                         stdout=subprocess.DEVNULL)


def test_nonces_never_repeat_across_restarts_and_twin_daemons(sec):
    """16.3 runs twice at once (c3 and c3b, started in the same second), then
    c3 is restarted at once after SIGTERM and after SIGKILL, while both send
    100 datagrams/s. Every datagram they send is captured at 1.1 (their only
    peer): each run has its own session and no nonce ever repeats, although
    the runs reuse the same (dst, ts, seq) counters."""
    mesh, tb, ip = sec, sec.tb, sec.ip
    a, b = mesh.peers["c3"], mesh.peers["c3b"]
    sniffers = {name: Sniffer(mesh, "s1", ip[name], 100000, 40, f"nonce-{name}") for name in ("c3", "c3b")}
    floods = []
    try:
        start(a)
        start(b)                       # the same ID, the same second
        wait_ready(a)
        wait_ready(b)
        floods = [flood(mesh, name, 15) for name in ("c3", "c3b")]   # killed below
        time.sleep(1.5)
        stop(b)
        restart = {}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # a quarter into a second: a restart that takes less than the rest
            # of it stamps datagrams in the second the old run stamped last
            time.sleep((1.25 - time.time() % 1) % 1)
            began = time.time()
            a.stop(sig)
            start(a)                   # at once
            wait_ready(a)
            restart[sig.name] = round(time.time() - began, 2)
            time.sleep(1.5)
    finally:
        for proc in floods:
            tb.stop(proc, signal.SIGKILL)
        stop(a)
        stop(b)
    captured = {name: s.datagrams(stop=True) for name, s in sniffers.items()}
    heads = {name: [header(d) for d in ds] for name, ds in distinct_datagrams(captured).items()}
    odd = [(name, i, h) for name, hs in heads.items() for i, h in enumerate(hs)
           if (h.src, h.dst) != (parse_id(N), parse_id("1.1"))]
    assert not odd, (odd, {n: s.path for n, s in sniffers.items()})
    c3_runs, twin = runs(heads["c3"]), runs(heads["c3b"])
    assert len(c3_runs) == 3 and len(twin) == 1, [len(r) for r in c3_runs + twin]
    everything = c3_runs + twin
    assert all(len(r) > 50 for r in everything), [len(r) for r in everything]
    assert len({r[0].session for r in everything}) == 4               # a new session per run
    nonces = [nonce(h) for hs in heads.values() for h in hs]
    assert len(set(nonces)) == len(nonces)                            # never a repeat
    for r in everything:                                              # in a run, (ts, seq) only grows
        assert all((p.ts, p.seq) < (q.ts, q.seq) for p, q in itertools.pairwise(r))
    shared = {"twins": shared_counters(c3_runs[0], twin[0]),
              "SIGTERM restart": shared_counters(c3_runs[0], c3_runs[1]),
              "SIGKILL restart": shared_counters(c3_runs[1], c3_runs[2])}
    assert shared["twins"] > 50, shared         # same second, same counters: only the session differs
    print(f"\nnonces: {len(nonces)} datagrams in {len(everything)} runs, all nonces distinct; "
          f"restart (signal to ready) {restart} s; (dst, ts, seq) shared between runs {shared}")


def faketime_lib() -> str | None:
    found = sorted(glob.glob(FAKETIME_GLOB))
    return found[0] if found else None


def faketime_env(workdir: Path) -> tuple[dict, Path]:
    """An environment that runs a process on a clock we can step (libfaketime,
    Debian package `faketime`), checked against Python's time.time()."""
    if faketime_lib() is None and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "install", "-y", "-q", "faketime"], ["apt-get", "update", "-q"],
                     ["apt-get", "install", "-y", "-q", "faketime"]):
            if faketime_lib() is not None:
                break
            subprocess.run(argv, capture_output=True, timeout=300, env=env, check=False)
    lib = faketime_lib()
    if lib is None:
        pytest.skip("libfaketime (Debian package faketime) cannot be installed; the core's clock-step "
                    "handling is covered by tests/test_node.py::test_sender_clock_stepping_back_gives_a_new_session")
    clock = workdir / "faketime.rc"
    clock.write_text("-100\n")
    env = {**os.environ, "LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(clock),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    r = subprocess.run([PY, "-c", "import time; print(time.time())"], capture_output=True, text=True, env=env,
                       check=False)
    offset = float(r.stdout or "nan") - time.time() if r.returncode == 0 else float("nan")
    if not -102 < offset < -98:
        pytest.skip(f"libfaketime does not move Python's time.time() here (offset {offset}); the core's "
                    "clock-step handling is covered by tests/test_node.py")
    return env, clock


def set_clock(clock: Path, offset: str) -> None:
    tmp = clock.with_suffix(".tmp")
    tmp.write_text(offset + "\n")
    tmp.replace(clock)                 # libfaketime never reads a half-written file


def test_clock_stepped_back_starts_a_new_session_and_never_reuses_a_nonce(sec):
    """16.3 runs under libfaketime while it sends 100 datagrams/s. Its clock
    jumps 9 s ahead (a bad NTP answer) and half a second later is stepped back
    by 10 s, into seconds it has already used. The daemon logs "clock stepped
    back: new session", the datagrams after the step carry a new session, and
    no nonce repeats, although (ts, seq) counters do."""
    mesh, tb, ip = sec, sec.tb, sec.ip
    a = mesh.peers["c3"]
    env, clock = faketime_env(mesh.workdir)
    set_clock(clock, "+0")
    sniff = Sniffer(mesh, "s1", ip["c3"], 100000, 40, "clock")
    log_start = a.log_path.stat().st_size if a.log_path.exists() else 0
    proc = None
    try:
        start(a, env)
        wait_ready(a)
        proc = flood(mesh, "c3", 6)
        time.sleep(2.0)
        set_clock(clock, "+9")         # ahead by 9 s
        time.sleep(0.5)
        set_clock(clock, "-1")         # back by 10 s
        time.sleep(2.0)
    finally:
        if proc is not None:
            tb.stop(proc, signal.SIGKILL)
        stop(a)
    heads = [header(d) for d in distinct_datagrams({"c3": sniff.datagrams(stop=True)})["c3"]]
    log = a.log_text()[log_start:]
    assert "clock stepped back: new session" in log, log[-3000:]
    sessions = runs(heads)
    assert len(sessions) == 2, [(len(r), r[0], r[-1]) for r in sessions]
    before, after = sessions
    assert max(h.ts for h in before) - min(h.ts for h in after) >= 8      # it went back ~10 s
    nonces = [nonce(h) for h in heads]
    assert len(set(nonces)) == len(nonces)
    for r in sessions:
        assert all((p.ts, p.seq) < (q.ts, q.seq) for p, q in itertools.pairwise(r))
    shared = shared_counters(before, after)
    assert shared > 0, "the step back did not reach seconds used before: the test proves nothing"
    print(f"\nclock step: {len(heads)} datagrams, sessions {len(before)} + {len(after)}, "
          f"ts {min(h.ts for h in before)}..{max(h.ts for h in before)} then "
          f"{min(h.ts for h in after)}..{max(h.ts for h in after)}; (ts, seq) reused under the new "
          f"session: {shared}; no nonce repeated")


# ---------------------------------------------------------------- forged shards and restarts

def rss_mib(peer) -> float:
    for line in Path(f"/proc/{peer.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


RSS_BUDGET_MIB = 40     # what a flood of forged shards may add to a daemon (docs/limits.md §3)


def test_a_flood_of_forged_shards_is_relayed_nowhere_keeps_nothing_and_engages_the_filter(sec):
    """Forged shards at the highest TTL, for client X (who has paths at both
    servers), from an outsider who knows the group name: nothing relayed,
    nothing kept for reassembly, RSS within budget, counted as
    auth_failure, the garbage-flood filter on, and the tunnel still works."""
    s1, s2, c1 = sec.peers["s1"], sec.peers["s2"], sec.peers["c1"]
    before1, before2 = status(s1), status(s2)
    rss0 = rss_mib(s1)
    flooders = [sec.tb.popen("eve", [PY, str(TOOLS / "forge_shards.py"), GROUP, M, X, sec.ip["s1"], str(PORT), "6"],
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]
    peak, reassembling = rss0, 0
    while any(f.poll() is None for f in flooders):
        peak = max(peak, rss_mib(s1))
        reassembling = max(reassembling, status(s1)["reassembling"])
        time.sleep(0.3)
    sent = sum(int(f.stdout.read()) for f in flooders)
    after1, after2 = status(s1), status(s2)
    print(f"\nforged shards sent {sent}, s1 RSS {rss0:.1f} -> peak {peak:.1f} MiB, "
          f"auth_failure +{after1['drops'].get('auth_failure', 0) - before1['drops'].get('auth_failure', 0)}")
    assert sent > 50_000
    assert reassembling == 0 and after1["reassembly_bytes"] == 0
    assert peak - rss0 < RSS_BUDGET_MIB, (rss0, peak)
    assert after1["drops"].get("auth_failure", 0) - before1["drops"].get("auth_failure", 0) > 10_000
    # nothing relayed for the source the forgeries name (X's own keepalives
    # go through 1.2 meanwhile, so only M's count is exact there)
    assert peer_of(after1, M)["relayed_packets"] == peer_of(before1, M)["relayed_packets"]
    assert peer_of(after2, M)["relayed_packets"] == peer_of(before2, M)["relayed_packets"]
    assert udp_drops(after2) == udp_drops(before2)           # s2 never saw one
    assert "garbage flood" in s1.log_text()
    assert wait_for(lambda: ping(c1, "10.17.1.1", 3)[1] == 3, 20)


def test_a_restarted_server_refuses_what_was_captured_before_it_started(sec):
    """Pings of M captured at 1.1, 1.1 restarted, the capture re-sent at once
    from M and from an outsider: nothing reaches 1.1's TUN (the sessions are
    not proven to the new daemon, and once M's is, the capture is older than
    its proof), no path is learned, and M's own traffic works again."""
    s1, m = sec.peers["s1"], sec.peers["c2"]
    sniff = Sniffer(sec, "s1", sec.ip["c2"], 64, 10, "restart")
    r, received = ping(m, "10.17.1.1", 8, 0.05)
    assert received == 8, r.stdout
    captured = [d for d in sniff.datagrams(stop=True) if header(d).kind == KIND_DATA]
    assert len(captured) >= 8           # (with parity for a prior, each ping is several shards)
    stop(s1)
    start(s1)
    wait_ready(s1)
    tun0 = tun_rx(sec.tb, "s1")
    send(sec, "eve", captured, "s1")
    send(sec, "c2", captured, "s1")
    time.sleep(0.5)
    assert tun_rx(sec.tb, "s1") == tun0
    row = peer_of(status(s1), M)
    assert row["drops"].get("unverified", 0) + row["drops"].get("replay", 0) >= 16, row
    assert all(p["address"] != f"{sec.ip['eve']}:{PORT}" or not p["proven"] for p in row["paths"])
    assert wait_for(lambda: ping(m, "10.17.1.1", 1)[1] == 1, 15)
    send(sec, "eve", captured, "s1")                 # after M's session is proven: still refused
    time.sleep(0.5)
    assert tun_rx(sec.tb, "s1") - tun0 <= 2          # only M's own ping above
    assert wait_for(lambda: all(peer_of(status(s1), i)["up"] for i in (X, M)), 15)


# ---------------------------------------------------------------- what the server opens on its host

def test_a_lan_host_cannot_open_connections_to_a_client_through_the_server(sec):
    """eve sits on the server's LAN and routes the tunnel network via 1.1, as
    a LAN host (or an attacker on it) would. The server lets its clients out
    and their replies in, but nothing new into the tunnel: eve's pings to
    16.2 never reach its TUN (dropped and counted by the server's own FORWARD
    DROP), while 16.2 still reaches 1.1 and beyond."""
    mesh, tb, ip = sec, sec.tb, sec.ip
    c2 = mesh.peers["c2"]
    tb.run("eve", ["ip", "route", "replace", "10.17.0.0/16", "via", ip["s1"]], check=True)
    try:
        def our_drops() -> int:
            out = tb.run("s1", ["iptables-legacy", "-v", "-x", "-n", "-L", "FORWARD"], check=True).stdout
            return sum(int(line.split()[0]) for line in out.splitlines()
                       if line.split()[2:3] == ["DROP"] and "alpaca-tunnel:" in line)
        dropped = our_drops()
        r, received = ping(c2, "10.17.1.1", 3)             # the client still gets out
        assert received == 3, r.stdout
        written = tun_rx(tb, "c2")
        r = tb.run("eve", ["ping", "-n", "-c", "5", "-i", "0.05", "-W", "1", "10.17.16.2"])
        assert " 0 received" in r.stdout, r.stdout
        assert tun_rx(tb, "c2") == written                # nothing of eve's reached the client
        assert our_drops() - dropped >= 5
        print(f"\neve -> 16.2 through 1.1: 0 of 5 delivered, {our_drops() - dropped} counted by the server's DROP")
    finally:
        tb.run("eve", ["ip", "route", "del", "10.17.0.0/16"])
