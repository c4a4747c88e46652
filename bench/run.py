"""Side-by-side benchmark: raw veth, wireguard-go, OpenVPN and alpaca-tunnel in one run.

    .venv/bin/python bench/run.py [--seconds 10] [--quick] [--loss 0,0.01,0.05,0.3]
                                  [--tunnels raw,wireguard-go,openvpn,alpaca,wg-udpspeeder]
                                  [--wan MS] [--paths 2] [--out FILE]

Two network namespaces (<prefix>-a, <prefix>-b) joined by one veth pair, no
bridge, nothing in the root namespace:

    <prefix>-a  eth0 172.30.1.1/24  <---- veth ---->  eth0 172.30.1.2/24  <prefix>-b
    wireguard-go  wg 172.30.2.1/24                     wg 172.30.2.2/24
    openvpn       tun 172.30.6.1 (peer 172.30.6.2)     tun 172.30.6.2 (peer 172.30.6.1)
    alpaca        server 1.1 = 10.17.1.1/16            client 16.1 = 10.17.16.1/16 (gateway 1.1)

OpenVPN is 2.6 point to point:
UDP 1194, a tun device, TLS with throw-away P-256 certificates pinned with
peer-fingerprint (-a tls-server, -b tls-client), data channel AES-256-GCM,
no DCO (disable-dco), everything else at its defaults.

The tunnels are measured one after the other (each on a freshly built pair,
torn down before the next, so they never share the CPU). For each tunnel:
iperf3 server in -a on the tunnel address, client in -b (b2a = -b sends;
a2b = iperf3 -R), 1 and 4 streams, the kernel's default congestion control
and CUBIC (-C cubic); ping -b -> -a (50 x 0.01 s) idle and during the
single-stream b2a run; CPU seconds (utime+stime from /proc/<pid>/stat) of the
tunnel daemons at both ends and of the whole machine per GB received.

Then the same tunnel is measured with per-datagram loss (--loss, default
0,0.01,0.05,0.3): veth offloads off on both ends (GSO/TSO/GRO/UDP GSO/GSO and
GRO lists, so one iptables verdict is one datagram) for every loss level
including 0, and an iptables-legacy `statistic --mode random` DROP on UDP
(raw veth: on every packet, TCP itself is on the lossy link) arriving in each
namespace. The drop ratio actually achieved is read back from the rule
counters.

Dual path (--paths 2): after a tunnel's usual single-path measurements, the
same runs again on a pair joined by TWO veth pairs, alpaca only (the other
tunnels have one peer address and no multi-path: their "-2paths" entry is
skipped with that reason):

    <prefix>-a  eth0 172.30.1.1/24  <---- veth 1 ---->  eth0 172.30.1.2/24  <prefix>-b
                eth1 172.30.4.1/24  <---- veth 2 ---->  eth1 172.30.4.2/24

The static addresses are crossed: -a's secrets.txt gives the client 16.1 at
172.30.4.2 (link 2), -b's gives the server 1.1 at 172.30.1.1 (link 1); each
end learns the other link from the source address of the other's
authenticated datagrams, so both send every datagram on both links. The
harness waits until `alpaca-tunnel status --json` lists two live paths at
both ends (recorded in the JSON at the start and at the end). The loss
rules sit on both links' interfaces, each drawing independently; their
counters are read back per link, and per-link rx counters of the interfaces
are recorded for every dual-path run.

WAN mode (--wan MS): a third namespace <prefix>-w sits between the two and
does not route; bench/wan_relay.py in it is the only way between -a and -b,
delaying every datagram MS ms each way and dropping it at random (--loss,
default 0,0.01,0.05,0.3, independently in each direction). The tunnels'
endpoints point at the relay's address on their own link:

    <prefix>-a  eth0 172.30.1.1/24 <-veth-> eth0 172.30.1.254/24  <prefix>-w  eth1 172.30.3.254/24 <-veth-> eth0 172.30.3.2/24  <prefix>-b

With --paths 2 a second pair of links joins the same -w, with a second relay
(same delay, same loss level, its own random draws) between them; the static
addresses are crossed as above (-b: 1.1 at 172.30.3.254, -a: 16.1 at
172.30.4.254):

    <prefix>-a  eth1 172.30.4.1/24 <-veth-> eth2 172.30.4.254/24  <prefix>-w  eth3 172.30.5.254/24 <-veth-> eth1 172.30.5.2/24  <prefix>-b

Offloads stay on (the relay cuts GSO trains into datagrams and drops each on
its own); per loss level one TCP stream b2a for 20 s (--seconds) with the
default congestion control and with CUBIC, and the idle ping. The raw column
is skipped (raw TCP cannot cross a UDP relay). Before the tunnels, the
relay's own capacity is measured with iperf3 UDP through it (-b sends
1400-byte datagrams at rising rates until more than 1 % is lost).

Writes a JSON file with every number, prints a compact table, and ends with
the line `alpaca/wireguard-go throughput ratio: X.XX` (single stream b2a,
default congestion control; clean link with offloads on, or in WAN mode the
0 % loss WAN). With --paths 2 a line before it compares alpaca's dual-path
b2a stream at each loss level with its single-path one without loss (same
offloads, same RTT). Needs root, iperf3, ping, ethtool, iptables-legacy;
wireguard-go and wg are optional (their column is skipped), so are openvpn
and openssl (apt-get install openvpn), and so is speederv2 (UDPspeeder, not
packaged in Debian) for the column "wireguard-go over UDPspeeder 20:10".
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from alpaca.lab.testbed import Testbed, wait_for, write_peer_config

UNDER_A, UNDER_B = "172.30.1.1", "172.30.1.2"
UNDER2_A, UNDER2_B = "172.30.4.1", "172.30.4.2"     # --paths 2: the second link
RELAY_A, RELAY_B = "172.30.1.254", "172.30.3.254"   # WAN mode: the relay on a's link and on b's
WAN_B = "172.30.3.2"                                # WAN mode: b's underlay address
RELAY2_A, RELAY2_B = "172.30.4.254", "172.30.5.254"  # WAN mode, --paths 2: the second relay's addresses
WAN2_B = "172.30.5.2"                               # WAN mode, --paths 2: b's address on the second link
WG_A, WG_B = "172.30.2.1", "172.30.2.2"
OVPN_A, OVPN_B = "172.30.6.1", "172.30.6.2"
OVPN_PORT = 1194
ALPACA_NET = "10.17"
ALPACA_A, ALPACA_B = "10.17.1.1", "10.17.16.1"
ALPACA_PORT = 1040
WG_PORT = 51820
SPEEDER_PORT, SPEEDER_LOCAL = 4096, "127.0.0.1:3333"
SPEEDER_FEC, SPEEDER_WG_MTU = "20:10", 1280
IPERF_PORT = 5201
IPT = "iptables-legacy"
HZ = os.sysconf("SC_CLK_TCK")

OFFLOAD_TX = ["gso", "tso", "tx-udp-segmentation", "tx-gso-list"]
OFFLOAD_RX = ["gro", "rx-gro-list", "rx-udp-gro-forwarding"]
OFFLOAD_SHOW = ["generic-segmentation-offload", "tcp-segmentation-offload", "generic-receive-offload",
                "large-receive-offload", "tx-udp-segmentation", "tx-gso-list", "rx-gro-list",
                "rx-udp-gro-forwarding"]
CNT, BIG, DROP = "bench-loss-cnt", "bench-loss-big", "bench-loss-drop"

# (streams, direction, congestion control, ping under load)
CLEAN_RUNS = [(1, "b2a", "default", True), (1, "a2b", "default", False), (4, "b2a", "default", False),
              (4, "a2b", "default", False), (1, "b2a", "cubic", False)]
LOSS_RUNS = [(1, "b2a", "default", True), (1, "b2a", "cubic", False), (1, "a2b", "default", False)]
QUICK_RUNS = [(1, "b2a", "default", True)]
WAN_RUNS = [(1, "b2a", "default", True), (1, "b2a", "cubic", False)]
TUNNELS = ["raw", "wireguard-go", "openvpn", "alpaca", "alpaca-fec-off", "alpaca-fec-20:10", "wg-udpspeeder"]
DUAL = "-2paths"              # suffix of a tunnel's --paths 2 entry in the results (e.g. "alpaca-2paths")
LABELS = {"wg-udpspeeder": f"wireguard-go over UDPspeeder {SPEEDER_FEC}", "alpaca" + DUAL: "alpaca 2 paths"}
LOSS = "0,0.01,0.05,0.3"      # default loss levels, low RTT and --wan alike
CAPACITY_RATES = [100, 200, 300, 400, 500, 600, 800, 1000, 1250, 1500, 2000]   # Mbit/s
CAPACITY_LEN, CAPACITY_MAX_LOSS = 1400, 1.0   # datagram payload bytes; % lost that still counts as forwarded


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_key(streams: int, direction: str, cc: str) -> str:
    return f"{streams}x-{direction}-{cc}"


# ---------------------------------------------------------------- /proc

def descendants(pid: int) -> list[int]:
    """pid and all its live descendants."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    keep = {pid}
    changed = True
    while changed:
        changed = False
        for p, pp in parent.items():
            if pp in keep and p not in keep:
                keep.add(p)
                changed = True
    return sorted(keep)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / HZ


def machine_ticks() -> dict[str, int]:
    """Whole machine, all cores: busy (user nice system irq softirq), idle (+iowait), steal."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


def busy_pct(seconds: float = 0.3) -> float:
    a = machine_ticks()
    time.sleep(seconds)
    b = machine_ticks()
    tot = sum(b.values()) - sum(a.values())
    return 100.0 * (b["busy"] - a["busy"]) / tot if tot > 0 else 0.0


def wait_quiet(args) -> float:
    """Wait until the machine is mostly idle, at most --quiet-max s per run and
    --quiet-budget s over the whole run (so the run stays short); returns the last busy %."""
    pct = busy_pct()
    t0 = time.monotonic()
    end = t0 + min(args.quiet_max, max(0.0, args.quiet_budget))
    while pct > args.quiet_pct and time.monotonic() < end:
        pct = busy_pct()
    args.quiet_budget -= time.monotonic() - t0
    return pct


# ---------------------------------------------------------------- topology

class Pair(Testbed):
    """Two namespaces <prefix>-a and <prefix>-b joined by one veth pair (eth0 on each side), or
    with paths=2 by two (eth0: link 1, eth1: link 2); unlike Testbed, no hub namespace and no
    bridge. Testbed's popen/run/stop/close are reused."""

    def __init__(self, prefix: str, paths: int = 1):   # deliberately not calling Testbed.__init__ (it builds a hub)
        self.prefix, self.subnet, self.hub = prefix, None, None
        self.hosts, self.namespaces, self.procs, self._ifcount = {}, [], [], 0
        self.paths = paths
        self.ifaces = self.interfaces()
        try:
            self.build()
        except BaseException:
            self.close()
            raise

    def interfaces(self) -> tuple:
        """(namespace, device) of every veth end (whose offloads are switched and shown)."""
        return tuple((side, f"eth{i}") for i in range(self.paths) for side in ("a", "b"))

    def build(self) -> None:
        self.add_link("a", "b", UNDER_A, UNDER_B, 24)
        if self.paths == 2:
            self.add_link("a", "b", UNDER2_A, UNDER2_B, 24)
            self.check_ping("b", UNDER2_A)
        self.hosts = {"a": UNDER_A, "b": UNDER_B}
        self.check_ping("b", UNDER_A)

    def check_ping(self, side: str, dst: str) -> None:
        if not wait_for(lambda: self.run(side, ["ping", "-c1", "-W1", "-q", dst]).returncode == 0, 5):
            raise RuntimeError(f"underlay ping {side} -> {dst} failed")

    def toward(self, side: str, link: int = 1) -> str:
        """The address a tunnel in `side` sends to, to reach the other side over `link`."""
        a, b = (UNDER_A, UNDER_B) if link == 1 else (UNDER2_A, UNDER2_B)
        return b if side == "a" else a

    def loss_ifaces(self) -> list[tuple[str, str, str]]:
        """(counter key, namespace, device) of every interface the loss applies to: "a", "b" on
        link 1, "a-link2", "b-link2" on link 2 (where the datagrams arrive in -a and -b)."""
        return [(side + ("" if i == 0 else f"-link{i + 1}"), side, f"eth{i}")
                for i in range(self.paths) for side in ("a", "b")]

    def link_rx(self) -> dict:
        """{"link1": {"a": {"packets", "bytes"}, "b": ...}, ...}: what each end received on each link
        (the interface counters; with --paths 2, shows that both links carry the tunnel)."""
        out = {}
        for i in range(self.paths):
            out[f"link{i + 1}"] = {}
            for side in ("a", "b"):
                st = self.link_stats(side, f"eth{i}")
                out[f"link{i + 1}"][side] = {"packets": st.get("rx_packets", 0), "bytes": st.get("rx_bytes", 0)}
        return out

    def sh(self, side: str, argv: list[str], check: bool = True, timeout: float = 30) -> str:
        r = self.run(side, argv, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.ns(side)}: {r.stderr.strip() or r.returncode}")
        return r.stdout

    def offloads(self, on: bool) -> dict:
        for side, dev in self.ifaces:
            # one feature per call: ethtool refuses the whole call if one is unknown
            for f in OFFLOAD_TX + ([] if on else OFFLOAD_RX):
                self.sh(side, ["ethtool", "-K", dev, f, "on" if on else "off"], check=False)
        state = self.offload_state()
        if not on:
            left = {s: [k for k, v in feats.items() if v == "on"] for s, feats in state.items()}
            if any(left.values()):
                raise RuntimeError(f"veth offloads still on: {left}")
        return state

    def offload_state(self) -> dict:
        """{"a": {feature: on/off}, ...}; keyed "<side>-<dev>" where a side has more than one device."""
        state = {}
        for side, dev in self.ifaces:
            feats = {}
            for line in self.sh(side, ["ethtool", "-k", dev]).splitlines():
                name, _, value = line.strip().partition(":")
                if name in OFFLOAD_SHOW:
                    feats[name] = value.split()[0] if value.split() else ""
            state[side if dev == "eth0" and (side, "eth1") not in self.ifaces else f"{side}-{dev}"] = feats
        return state

    # ------------------------------------------------------------ loss emulation
    def set_loss(self, p: float, udp_only: bool) -> None:
        """Counting rules (+ a DROP when p > 0) on packets arriving on each link's interface in both
        namespaces; every DROP rule draws on its own, so the links lose independently."""
        self.clear_loss()
        m = ["-p", "udp"] if udp_only else []
        self._rules = []
        for key, side, dev in self.loss_ifaces():
            tag = "" if dev == "eth0" else f"-{dev}"
            specs = [["-i", dev, *m, "-m", "comment", "--comment", CNT + tag],
                     ["-i", dev, *m, "-m", "length", "--length", "1501:65535", "-m", "comment", "--comment", BIG + tag]]
            if p > 0:
                specs.append(["-i", dev, *m, "-m", "statistic", "--mode", "random", "--probability", f"{p:.6f}",
                              "-m", "comment", "--comment", DROP + tag, "-j", "DROP"])
            for spec in specs:
                self.sh(side, [IPT, "-w", "-A", "INPUT", *spec])
                self._rules.append((side, spec))

    def clear_loss(self) -> None:
        for side, spec in getattr(self, "_rules", []):
            self.sh(side, [IPT, "-w", "-D", "INPUT", *spec], check=False)
        self._rules = []

    def counters(self) -> dict:
        """{"a": {"seen", "oversize", "dropped"}, "b": {...}} packets counted by our rules on link 1
        (arriving in -a, in -b); "a-link2", "b-link2" the same on link 2 with --paths 2."""
        out, listing = {}, {}
        for key, side, dev in self.loss_ifaces():
            if side not in listing:
                listing[side] = self.sh(side, [IPT, "-w", "-L", "INPUT", "-v", "-n", "-x"]).splitlines()
            tag = "" if dev == "eth0" else f"-{dev}"
            c = {"seen": 0, "oversize": 0, "dropped": 0}
            for line in listing[side]:
                for k, comment in (("seen", CNT), ("oversize", BIG), ("dropped", DROP)):
                    if f"/* {comment + tag} */" in line:
                        c[k] = int(line.split()[0])
            out[key] = c
        return out


def counter_delta(before: dict, after: dict) -> dict:
    d = {s: {k: after[s][k] - before[s][k] for k in after[s]} for s in after}
    sides = [v for v in d.values() if "seen" in v]
    seen = sum(v["seen"] for v in sides)
    dropped = sum(v["dropped"] for v in sides)
    d["total"] = {"seen": seen, "dropped": dropped, "oversize": sum(v.get("oversize", 0) for v in sides),
                  "drop_ratio": dropped / seen if seen else None}
    links: dict[str, dict] = {}
    for key, v in d.items():
        if "seen" in v and key != "total":
            link = links.setdefault("link" + (key.split("-link")[1] if "-link" in key else "1"),
                                    {"seen": 0, "dropped": 0})
            link["seen"] += v["seen"]
            link["dropped"] += v["dropped"]
    if len(links) > 1:      # --paths 2: each link's own figures (both directions)
        for link in links.values():
            link["drop_ratio"] = link["dropped"] / link["seen"] if link["seen"] else None
        d["links"] = links
    return d


class WanPair(Pair):
    """WAN mode: <prefix>-a <-veth-> <prefix>-w <-veth-> <prefix>-b. -w does not route
    (ip_forward 0): bench/wan_relay.py in it is the only way between -a and -b. set_loss,
    clear_loss and counters (re)start, stop and read the relay instead of iptables rules.
    paths=2: a second pair of links through -w (-a eth1 <-> -w eth2, -w eth3 <-> -b eth1) with
    a second relay process of its own between them (same delay and loss, its own seed)."""

    def __init__(self, prefix: str, args, work: Path, paths: int = 1):
        self.delay_ms, self.seed, self.rt_prio, self.work = args.wan, args.seed, args.relay_rt_prio, work
        self.ports: dict[int, tuple] = {}                 # link -> (port, a_port, b_port)
        self.relays: dict[int, subprocess.Popen] = {}     # link -> running relay
        self._out: dict[int, bytes] = {}
        self.relay_starts = 0
        self.snapshots: dict[int, dict] = {}  # link -> that relay's latest report
        self.reports: list[dict] = []         # the final report of every relay run
        super().__init__(prefix, paths)

    def interfaces(self) -> tuple:
        one = (("a", "eth0"), ("w", "eth0"), ("w", "eth1"), ("b", "eth0"))
        return one + ((("a", "eth1"), ("w", "eth2"), ("w", "eth3"), ("b", "eth1")) if self.paths == 2 else ())

    def build(self) -> None:
        self.add_link("a", "w", UNDER_A, RELAY_A, 24)
        self.add_link("w", "b", RELAY_B, WAN_B, 24)
        if self.paths == 2:
            self.add_link("a", "w", UNDER2_A, RELAY2_A, 24)
            self.add_link("w", "b", RELAY2_B, WAN2_B, 24)
            self.check_ping("a", RELAY2_A)
            self.check_ping("b", RELAY2_B)
        self.hosts = {"a": UNDER_A, "b": WAN_B}
        self.check_ping("a", RELAY_A)
        self.check_ping("b", RELAY_B)

    def toward(self, side: str, link: int = 1) -> str:
        if link == 1:
            return RELAY_A if side == "a" else RELAY_B
        return RELAY2_A if side == "a" else RELAY2_B

    @property
    def snapshot(self) -> dict | None:
        """The latest report of the relay (with two links: {"link1": ..., "link2": ...})."""
        if len(self.snapshots) <= 1:
            return self.snapshots.get(1)
        return {f"link{k}": v for k, v in sorted(self.snapshots.items())}

    def forward_tcp(self, port: int) -> None:
        """A TCP connection from -b to RELAY_B:port reaches UNDER_A:port through -w undelayed
        (DNAT, SNAT to RELAY_A; only that TCP port is forwarded): iperf3's control connection,
        while its UDP to the same address and port goes through the relay."""
        for rule in (["-P", "FORWARD", "DROP"],
                     ["-A", "FORWARD", "-i", "eth1", "-o", "eth0", "-p", "tcp", "--dport", str(port), "-j", "ACCEPT"],
                     ["-A", "FORWARD", "-i", "eth0", "-o", "eth1", "-p", "tcp", "--sport", str(port), "-j", "ACCEPT"],
                     ["-t", "nat", "-A", "PREROUTING", "-i", "eth1", "-d", RELAY_B, "-p", "tcp", "--dport", str(port),
                      "-j", "DNAT", "--to-destination", f"{UNDER_A}:{port}"],
                     ["-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-d", UNDER_A, "-p", "tcp", "--dport", str(port),
                      "-j", "SNAT", "--to-source", RELAY_A]):
            self.sh("w", [IPT, "-w", *rule])
        self.sh("w", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])

    # ------------------------------------------------------------ the relay
    def relay(self, port: int, a_port: int | None, b_port: int | None, link: int = 1) -> None:
        """The relay of `link` listens on `port` on both of that link's sides and talks to -a's and
        -b's address on that link at a_port and b_port (None: the peer's address is learned
        from what it sends)."""
        self.ports[link] = (port, a_port, b_port)

    def start_relay(self, loss: float) -> None:
        for link in sorted(self.ports):
            self._start_relay(link, loss)

    def _start_relay(self, link: int, loss: float) -> None:
        port, a_port, b_port = self.ports[link]
        listen_a, listen_b = (RELAY_A, RELAY_B) if link == 1 else (RELAY2_A, RELAY2_B)
        peer_a, peer_b = (UNDER_A, WAN_B) if link == 1 else (UNDER2_A, WAN2_B)
        self.relay_starts += 1
        argv = [sys.executable, str(ROOT / "bench" / "wan_relay.py"), "--a-listen", f"{listen_a}:{port}",
                "--b-listen", f"{listen_b}:{port}", "--delay-ms", f"{self.delay_ms:g}", "--loss", f"{loss:g}",
                "--seed", str(self.seed + 2 * self.relay_starts), "--rt-prio", str(self.rt_prio)]
        argv += ["--a-peer", f"{peer_a}:{a_port}"] if a_port else []
        argv += ["--b-peer", f"{peer_b}:{b_port}"] if b_port else []
        logpath = self.work / f"{self.prefix}-relay-{self.relay_starts}.log"
        with open(logpath, "wb") as logf:
            proc = self.relays[link] = self.popen("w", argv, stdout=subprocess.PIPE, stderr=logf, bufsize=0)
        self._out[link] = b""
        if not wait_for(lambda: "wan_relay: ready" in logpath.read_text(errors="replace")
                        or proc.poll() is not None, 10, 0.05) or proc.poll() is not None:
            raise RuntimeError(f"wan_relay did not start: {logpath.read_text(errors='replace')[-400:]}")

    def stop_relay(self) -> dict | None:
        """Stops every relay; returns the final report (as `snapshot`), None if there was none."""
        relays, self.relays = self.relays, {}
        for link, proc in sorted(relays.items()):
            self.stop(proc, signal.SIGTERM, timeout=10)
            self._out[link] += proc.stdout.read()
            proc.stdout.close()
            lines = self._out[link].decode(errors="replace").strip().splitlines()
            try:
                final = json.loads(lines[-1])
            except (IndexError, ValueError):
                continue
            self.snapshots[link] = final
            self.reports.append({**final, "link": link} if self.paths > 1 else final)
        return self.snapshot if relays else None

    def relay_report(self, link: int = 1, timeout: float = 5) -> dict:
        """SIGUSR1: the relay prints its counters as one JSON line."""
        proc = self.relays[link]
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while b"\n" not in self._out[link]:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                raise RuntimeError("wan_relay did not report its counters")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"wan_relay exited ({proc.poll()})")
            self._out[link] += chunk
        line, self._out[link] = self._out[link].split(b"\n", 1)
        self.snapshots[link] = json.loads(line)
        return self.snapshots[link]

    def set_loss(self, p: float, udp_only: bool) -> None:
        """Fresh relays (fresh counters) dropping p of the datagrams in each direction."""
        self.stop_relay()
        self.start_relay(p)

    def clear_loss(self) -> None:
        self.stop_relay()

    def counters(self) -> dict:
        """Like Pair.counters: "a" = datagrams on their way to -a (b2a), "b" = to -b (a2b), through
        the relay of link 1; "a-link2", "b-link2" through that of link 2; "relay": CPU seconds."""
        out: dict = {}
        cpu = {}
        for link in sorted(self.relays):
            snap = self.relay_report(link)
            tag = "" if link == 1 else f"-link{link}"

            def way(direction: str, src: str, snap=snap) -> dict:
                c = snap[direction]
                return {"seen": c["received"], "dropped": c["dropped"], "forwarded": c["forwarded"],
                        "late": c["late"], "kernel_drops": snap["kernel_drops"][src] or 0,
                        "lost": c["send_errors"] + c["no_peer"] + c["stray"]}
            out["a" + tag], out["b" + tag] = way("b2a", "b"), way("a2b", "a")
            cpu[link] = snap["cpu_s"]
        out["relay"] = {"cpu_s": sum(cpu.values())}
        if len(cpu) > 1:
            out["relay"].update({f"cpu_s_link{k}": v for k, v in cpu.items()})
        return out


# ---------------------------------------------------------------- tunnels

class Tunnel:
    name = "?"
    dst = UNDER_A              # address of -a the traffic goes to
    udp_only = True            # loss rule matches tunnel datagrams only
    relay_ports: tuple | None = None   # WAN mode: WanPair.relay(port, a_port, b_port); None: cannot cross it
    multipath = False          # --paths 2 measures it (sends on both links); others are skipped
    relay_ports2: tuple | None = None  # WAN mode, --paths 2: the second relay's ports

    def available(self) -> str | None:
        return None

    def state(self, pair: Pair) -> dict | None:
        """The daemons' own view (JSON), recorded when the tunnel is up and after the runs."""
        return None

    def check_alive(self) -> None:
        """After each condition: a daemon that died fails the tunnel (with its log) instead of
        letting every later run time out."""
        dead = {side: p.returncode for side, p in self.daemons.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"{self.name} daemon(s) exited {dead}: {self.log_tail()}")

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons: dict[str, object] = {}

    def stop(self, pair: Pair) -> None:
        for proc in self.daemons.values():
            pair.stop(proc, signal.SIGTERM, timeout=10)

    def versions(self) -> dict:
        return {}

    def log_tail(self) -> str:
        return ""


class Raw(Tunnel):
    name = "raw"
    udp_only = False           # TCP itself is on the lossy link

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons = {}


class WireguardGo(Tunnel):
    name = "wireguard-go"
    dst = WG_A
    mtu = 1420
    relay_ports = (WG_PORT, WG_PORT, WG_PORT)

    def available(self) -> str | None:
        missing = [b for b in ("wireguard-go", "wg") if shutil.which(b) is None]
        return f"not installed: {', '.join(missing)} (apt-get install wireguard-go wireguard-tools)" if missing else None

    def versions(self) -> dict:
        r = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True, check=False)
        return {"wireguard-go": (r.stdout.split("\n")[0] or r.stderr.strip()).strip()}

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons, self.work = {}, work
        self.ifname = {"a": f"{pair.prefix}wa", "b": f"{pair.prefix}wb"}   # sockets in /var/run/wireguard are global
        keys, pubs = {}, {}
        for side in ("a", "b"):
            key = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
            keys[side] = work / f"wg-{side}.key"
            keys[side].touch(0o600)
            keys[side].write_text(key + "\n")
            pubs[side] = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True,
                                        check=True).stdout.strip()
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
        for side in ("a", "b"):
            self._sock(side).unlink(missing_ok=True)
            with open(work / f"wg-{side}.log", "wb") as logf:     # the child keeps its own copy
                self.daemons[side] = pair.popen(side, ["wireguard-go", "-f", self.ifname[side]], env=env,
                                                stdout=logf, stderr=logf)
        for side in ("a", "b"):
            if not wait_for(lambda side=side: self._sock(side).exists(), 10):
                raise RuntimeError(f"wireguard-go in {side} did not start: {self.log_tail()}")
        addr = {"a": WG_A, "b": WG_B}
        for side, other in (("a", "b"), ("b", "a")):
            dev = self.ifname[side]
            endpoint = self.endpoint(pair, side)
            pair.sh(side, ["wg", "set", dev, "listen-port", str(WG_PORT), "private-key", str(keys[side]),
                           "peer", pubs[other], "allowed-ips", f"{addr[other]}/32",
                           *(["endpoint", endpoint] if endpoint else [])])
            pair.sh(side, ["ip", "addr", "add", f"{addr[side]}/24", "dev", dev])
            pair.sh(side, ["ip", "link", "set", dev, "mtu", str(self.mtu), "up"])

    def endpoint(self, pair: Pair, side: str) -> str | None:
        """Where wireguard-go in `side` sends to (None: it learns the address from the handshake)."""
        return f"{pair.toward(side)}:{WG_PORT}"

    def stop(self, pair: Pair) -> None:
        super().stop(pair)
        for side in ("a", "b"):
            self._sock(side).unlink(missing_ok=True)

    def _sock(self, side: str) -> Path:
        return Path("/var/run/wireguard") / f"{self.ifname[side]}.sock"

    def log_tail(self) -> str:
        return " | ".join((self.work / f"wg-{s}.log").read_text(errors="replace")[-300:]
                          for s in ("a", "b") if (self.work / f"wg-{s}.log").exists())


class OpenVPN(Tunnel):
    """OpenVPN 2.6 point to point: UDP, a tun device,
    TLS with throw-away self-signed P-256 certificates pinned with peer-fingerprint (-a is the
    TLS server), data channel AES-256-GCM, DCO off (the userspace data path; the VM has no DCO
    module anyway), everything else OpenVPN's defaults (tun-mtu 1500, mssfix 1492). Each end's
    remote is toward(side): the other end, or in WAN mode the relay on its own link."""
    name = "openvpn"
    dst = OVPN_A
    relay_ports = (OVPN_PORT, OVPN_PORT, OVPN_PORT)

    def available(self) -> str | None:
        missing = [b for b in ("openvpn", "openssl") if shutil.which(b) is None]
        return f"not installed: {', '.join(missing)} (apt-get install openvpn openssl)" if missing else None

    def versions(self) -> dict:
        out = {}
        for tool, argv in (("openvpn", ["openvpn", "--version"]), ("openssl", ["openssl", "version"])):
            r = subprocess.run(argv, capture_output=True, text=True, check=False)
            out[tool] = (r.stdout.split("\n")[0] or r.stderr.strip()).strip()
        return out

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons, self.work = {}, work
        fingerprint = {}
        for side in ("a", "b"):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", str(work / f"ovpn-{side}.key"), "-out", str(work / f"ovpn-{side}.crt"),
                            "-days", "30", "-subj", f"/CN=bench-{side}"], capture_output=True, check=True)
            r = subprocess.run(["openssl", "x509", "-in", str(work / f"ovpn-{side}.crt"), "-noout", "-fingerprint",
                                "-sha256"], capture_output=True, text=True, check=True)
            fingerprint[side] = r.stdout.strip().split("=", 1)[1]
        addr = {"a": OVPN_A, "b": OVPN_B}
        for side, other in (("a", "b"), ("b", "a")):
            conf = work / f"ovpn-{side}.conf"
            conf.write_text("\n".join([
                f"dev ovpn{side}", "dev-type tun", "proto udp",
                f"local {pair.hosts[side]}", f"lport {OVPN_PORT}", f"remote {pair.toward(side)} {OVPN_PORT}",
                f"ifconfig {addr[side]} {addr[other]}",
                *(["tls-server", "dh none"] if side == "a" else ["tls-client"]),
                f"cert {work / f'ovpn-{side}.crt'}", f"key {work / f'ovpn-{side}.key'}",
                f"peer-fingerprint {fingerprint[other]}", "data-ciphers AES-256-GCM", "disable-dco", "verb 3", ""]))
            with open(work / f"ovpn-{side}.log", "wb") as logf:
                self.daemons[side] = pair.popen(side, ["openvpn", "--config", str(conf)], stdout=logf, stderr=logf)

        def ready(side: str) -> bool:
            log_text = (work / f"ovpn-{side}.log").read_text(errors="replace")
            return "Initialization Sequence Completed" in log_text or self.daemons[side].poll() is not None
        for side in ("a", "b"):
            if not wait_for(lambda side=side: ready(side), 30, 0.2) or self.daemons[side].poll() is not None:
                raise RuntimeError(f"openvpn in {side} did not come up: {self.log_tail()}")

    def log_tail(self) -> str:
        return " | ".join((self.work / f"ovpn-{s}.log").read_text(errors="replace")[-400:]
                          for s in ("a", "b") if (self.work / f"ovpn-{s}.log").exists())


class Alpaca(Tunnel):
    """alpaca-tunnel's daemon (python -m alpaca) at both ends: server 1.1 in -a, client 16.1 in -b.
    --paths 2: static addresses crossed between the links (see the module docstring)."""
    name = "alpaca"
    fec = "auto"               # config `fec` of both ends
    dst = ALPACA_A
    relay_ports = (ALPACA_PORT, ALPACA_PORT, None)     # the server learns the client's address
    multipath = True
    relay_ports2 = (ALPACA_PORT, ALPACA_PORT, ALPACA_PORT)   # -a sends first on link 2: both ends fixed

    def versions(self) -> dict:
        def git(*argv):
            r = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False)
            return r.stdout.strip() if r.returncode == 0 else None
        return {"alpaca-tunnel": git("rev-parse", "--short", "HEAD"),
                "alpaca-tunnel dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
                "python": platform.python_version()}

    def start(self, pair: Pair, work: Path) -> None:
        self.daemons, self.work = {}, work
        keys = {i: secrets.token_urlsafe(32) for i in ("1.1", "16.1")}    # the format of `alpaca-tunnel genkey`
        server, client = f"1.1 {keys['1.1']}", f"16.1 {keys['16.1']}"
        if pair.paths == 1:
            # the client in -b reaches the server at toward("b"); a peer's own line gives only its key
            both = [f"{server} {pair.toward('b')} null {ALPACA_PORT}", f"{client} null null null"]
            lines = {"a": both, "b": both}
        else:
            # crossed: -b knows the server on link 1, -a knows the client on link 2; each end learns
            # the other link from the source of the other's datagrams, so both send on both links
            lines = {"a": [f"{server} null null null", f"{client} {pair.toward('a', 2)} null {ALPACA_PORT}"],
                     "b": [f"{server} {pair.toward('b', 1)} null {ALPACA_PORT}", f"{client} null null null"]}
        cfgs = {"a": {"id": "1.1", "mode": "server"},
                "b": {"id": "16.1", "mode": "client", "gateway": "1.1"}}
        self.config = {}
        for side, cfg in cfgs.items():
            path = self.config[side] = write_peer_config(work / f"alpaca-{side}", {
                **cfg, "group": "bench", "net": ALPACA_NET, "port": ALPACA_PORT, "log_level": "warning",
                "fec": self.fec,
                "control_socket": str(work / f"alpaca-{side}.sock")}, lines[side])
            with open(work / f"alpaca-{side}.log", "wb") as logf:
                self.daemons[side] = pair.popen(side, [sys.executable, "-m", "alpaca", "-C", str(path)],
                                                stdout=logf, stderr=logf, cwd=str(ROOT))
        for side in ("a", "b"):
            if not wait_for(lambda side=side: (self.work / f"alpaca-{side}.sock").exists()
                            or self.daemons[side].poll() is not None, 20) \
                    or self.daemons[side].poll() is not None:
                raise RuntimeError(f"alpaca in {side} did not start: {self.log_tail()}")

    def status(self, pair: Pair, side: str) -> dict:
        """`alpaca-tunnel -C <config> status --json` of the daemon in `side`."""
        r = pair.run(side, [sys.executable, "-m", "alpaca", "-C", str(self.config[side]), "status", "--json"],
                     timeout=15, cwd=str(ROOT))
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {"error": (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}")[-300:]}

    def state(self, pair: Pair) -> dict:
        """Per end: the peer it talks to, as `status --json` has it (paths, loss, parity, drops...)."""
        out = {}
        for side in ("a", "b"):
            st = self.status(pair, side)
            out[side] = st if "error" in st else {k: st.get(k) for k in ("id", "mode", "peers", "drops")}
        return out

    @staticmethod
    def live_paths(state: dict, side: str, max_age: float = 5.0) -> list[str]:
        """Addresses of the paths on which `side` heard its peer within max_age seconds."""
        peers = (state.get(side) or {}).get("peers") or []
        return [p["address"] for peer in peers for p in peer.get("paths", [])
                if p.get("last_rx_age") is not None and p["last_rx_age"] <= max_age]

    def wait_paths(self, pair: Pair, n: int, timeout: float = 15) -> dict:
        """Wait until both ends list n live paths to each other (keepalives and pings flow meanwhile)."""
        last: dict = {}

        def ok() -> bool:
            nonlocal last
            pair.run("b", ["ping", "-c1", "-W1", "-q", self.dst])
            last = self.state(pair)
            return all(len(self.live_paths(last, s)) >= n for s in ("a", "b"))
        if not wait_for(ok, timeout, 0.5):
            raise RuntimeError(f"alpaca: not {n} live paths at both ends within {timeout:g} s: "
                               f"a {self.live_paths(last, 'a')}, b {self.live_paths(last, 'b')}")
        return last

    def log_tail(self) -> str:
        return " | ".join((self.work / f"alpaca-{s}.log").read_text(errors="replace")[-400:]
                          for s in ("a", "b") if (self.work / f"alpaca-{s}.log").exists())


class WgSpeeder(WireguardGo):
    """wireguard-go through UDPspeeder (FEC 20:10), the recipe users stack today:
    -b: wg -> SPEEDER_LOCAL speederv2 -c -> toward(b):SPEEDER_PORT; -a: speederv2 -s on
    UNDER_A:SPEEDER_PORT -> 127.0.0.1:WG_PORT wg (which learns its peer's address).
    WireGuard's MTU is lowered to 1280, as UDPspeeder's docs advise for a tunnel on top."""
    name = "wg-udpspeeder"
    mtu = SPEEDER_WG_MTU
    relay_ports = (SPEEDER_PORT, SPEEDER_PORT, None)   # the speeder client sends from an ephemeral port

    def available(self) -> str | None:
        if shutil.which("speederv2") is None:
            return "speederv2 (UDPspeeder) not on PATH; it is not packaged in Debian"
        return super().available()

    def versions(self) -> dict:
        try:
            r = subprocess.run(["speederv2", "-h"], capture_output=True, text=True, timeout=5, check=False)
            lines = [x.strip() for x in (r.stdout + r.stderr).splitlines() if "version" in x.lower()]
        except (OSError, subprocess.TimeoutExpired):
            lines = []
        return {**super().versions(), "speederv2": shutil.which("speederv2"),
                "speederv2 version": lines[0] if lines else None, "fec": SPEEDER_FEC}

    def endpoint(self, pair: Pair, side: str) -> str | None:
        return SPEEDER_LOCAL if side == "b" else None

    def start(self, pair: Pair, work: Path) -> None:
        self.work, key = work, secrets.token_hex(8)
        argv = {"a": ["-s", "-l", f"{UNDER_A}:{SPEEDER_PORT}", "-r", f"127.0.0.1:{WG_PORT}"],
                "b": ["-c", "-l", SPEEDER_LOCAL, "-r", f"{pair.toward('b')}:{SPEEDER_PORT}"]}
        speeders = {}
        for side in ("a", "b"):
            with open(work / f"speeder-{side}.log", "wb") as logf:
                speeders[f"speeder-{side}"] = pair.popen(side, ["speederv2", *argv[side], f"-f{SPEEDER_FEC}",
                                                                "-k", key], stdout=logf, stderr=logf)
        super().start(pair, work)
        self.daemons.update(speeders)

    def log_tail(self) -> str:
        return " | ".join([super().log_tail()] + [(self.work / f"speeder-{s}.log").read_text(errors="replace")[-300:]
                                                  for s in ("a", "b") if (self.work / f"speeder-{s}.log").exists()])


class AlpacaFecOff(Alpaca):
    """alpaca with `fec: "off"`: what FEC's adaptive mode costs on a clean link, and does on a lossy one."""
    name, fec, multipath = "alpaca-fec-off", "off", False


class AlpacaFec2010(Alpaca):
    """alpaca with a fixed `fec: "20:10"` (UDPspeeder's recipe): protected from the first packet."""
    name, fec, multipath = "alpaca-fec-20:10", "20:10", False


CLASSES = {"raw": Raw, "wireguard-go": WireguardGo, "openvpn": OpenVPN, "alpaca": Alpaca,
           "alpaca-fec-off": AlpacaFecOff, "alpaca-fec-20:10": AlpacaFec2010, "wg-udpspeeder": WgSpeeder}


# ---------------------------------------------------------------- measurements

PING_RE = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def ping(pair: Pair, dst: str, count: int = 50, interval: float = 0.01) -> dict:
    r = pair.run("b", ["ping", "-c", str(count), "-i", str(interval), "-W", "1", "-q", dst], timeout=count + 20)
    out = {"count": count, "interval_s": interval}
    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    if m:
        out["sent"], out["received"] = int(m.group(1)), int(m.group(2))
        out["loss_pct"] = 100.0 * (1 - out["received"] / out["sent"]) if out["sent"] else None
    m = PING_RE.search(r.stdout)
    if m:
        out.update(zip(("min_ms", "avg_ms", "max_ms", "mdev_ms"), map(float, m.groups())))
    return out


def iperf(pair: Pair, tunnel: Tunnel, args, streams: int, direction: str, cc: str, ping_load: bool,
          lossy: bool) -> dict:
    res: dict = {"streams": streams, "direction": direction, "cc": cc, "seconds": args.seconds}
    res["busy_pct_before"] = round(wait_quiet(args), 1)
    srv = pair.popen("a", ["iperf3", "-s", "-1", "-B", tunnel.dst, "-p", str(IPERF_PORT)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        listening = wait_for(lambda: pair.run("a", ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]).stdout.strip(), 5, 0.05)
        if not listening:
            res["error"] = "iperf3 server did not listen"
            return res
        argv = ["iperf3", "-c", tunnel.dst, "-p", str(IPERF_PORT), "-t", str(args.seconds), "-J"]
        argv += ["-P", str(streams)] if streams > 1 else []
        argv += ["-R"] if direction == "a2b" else []
        argv += ["-C", cc] if cc != "default" else []
        pids = {side: descendants(p.pid) for side, p in tunnel.daemons.items()}
        c0 = pair.counters() if lossy else None
        rx0 = pair.link_rx() if pair.paths > 1 else None
        cpu0 = {side: cpu_seconds(p) for side, p in pids.items()}
        m0, t0 = machine_ticks(), time.monotonic()
        cli = pair.popen("b", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if ping_load:
                time.sleep(min(2.0, args.seconds / 3))
                res["ping_load"] = ping(pair, tunnel.dst)
            out, err = cli.communicate(timeout=args.seconds + 30)
        except subprocess.TimeoutExpired:
            pair.stop(cli, signal.SIGKILL, 5)
            out, err = cli.communicate()
            res["error"] = "iperf3 client timed out"
        t1, m1 = time.monotonic(), machine_ticks()
        cpu1 = {side: cpu_seconds(p) for side, p in pids.items()}
        if lossy:
            res["loss_counters"] = counter_delta(c0, pair.counters())
        if rx0 is not None:     # what each end received on each link's interface during the run
            rx1 = pair.link_rx()
            res["link_rx"] = {link: {side: {k: rx1[link][side][k] - v for k, v in c.items()}
                                     for side, c in sides.items()} for link, sides in rx0.items()}
    finally:
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            pair.stop(srv, signal.SIGKILL, 5)
    res["wall_s"] = round(t1 - t0, 3)
    if "relay" in res.get("loss_counters", {}):
        res["relay_cpu_pct"] = 100 * res["loss_counters"]["relay"]["cpu_s"] / max(1e-3, t1 - t0)
    try:
        j = json.loads(out)
    except ValueError:
        res.setdefault("error", f"iperf3 gave no JSON: {err.strip()[-300:]}")
        return res
    if "error" in j:
        res["error"] = j["error"]
    end = j.get("end", {})
    recv, sent = end.get("sum_received", {}), end.get("sum_sent", {})
    if not recv:
        res.setdefault("error", "iperf3 result has no sum_received")
        return res
    gb = recv["bytes"] / 1e9
    res.update({
        "mbit_s": recv["bits_per_second"] / 1e6,
        "sender_mbit_s": sent.get("bits_per_second", 0) / 1e6,
        "bytes": recv["bytes"],
        "iperf_seconds": recv.get("seconds"),
        "retransmits": sent.get("retransmits"),
        "sender_cc": end.get("sender_tcp_congestion"),
        "receiver_cc": end.get("receiver_tcp_congestion"),
        "iperf_cpu": end.get("cpu_utilization_percent"),
    })
    cpu = {side: cpu1[side] - cpu0[side] for side in cpu0}
    busy = (m1["busy"] - m0["busy"]) / HZ
    res["daemon_cpu_s"] = {**cpu, "total": sum(cpu.values())} if cpu else None
    res["daemon_cpu_s_per_gb"] = sum(cpu.values()) / gb if cpu and gb > 0 else None
    res["machine_busy_s"] = busy
    res["machine_steal_s"] = (m1["steal"] - m0["steal"]) / HZ
    res["machine_cpu_s_per_gb"] = busy / gb if gb > 0 else None
    res["machine_busy_pct"] = 100 * (m1["busy"] - m0["busy"]) / max(1, sum(m1.values()) - sum(m0.values()))
    return res


def measure_condition(pair: Pair, tunnel: Tunnel, args, runs, lossy: bool, cond: dict) -> None:
    # --idle: each run starts from a tunnel that carried nothing for that
    # long (the idle ping comes after the runs then, not before them)
    cond.update({"ping_idle": None if args.idle else ping(pair, tunnel.dst), "runs": {}, "idle_s": args.idle})
    c0 = pair.counters() if lossy else None
    for streams, direction, cc, ping_load in runs:
        if args.idle:
            time.sleep(args.idle)
        key = run_key(streams, direction, cc)
        r = cond["runs"][key] = iperf(pair, tunnel, args, streams, direction, cc, ping_load, lossy)
        txt = f"{r['mbit_s']:9.1f} Mbit/s" if "mbit_s" in r else "   failed"
        if r.get("daemon_cpu_s_per_gb") is not None:
            txt += f", {r['daemon_cpu_s_per_gb']:.1f} daemon CPU s/GB"
        if r.get("loss_counters"):
            tot = r["loss_counters"]["total"]
            txt += f", dropped {100 * (tot['drop_ratio'] or 0):.2f} % of {tot['seen']}"
            links = r["loss_counters"].get("links") or {}
            txt += "".join(f" ({k} {100 * (v['drop_ratio'] or 0):.2f} % of {v['seen']})" for k, v in links.items())
        elif r.get("link_rx"):
            txt += ", rx packets " + ", ".join(f"{k} {sum(c['packets'] for c in v.values())}"
                                               for k, v in r["link_rx"].items())
        log(f"  {tunnel.name:12s} {key:16s} {txt}" + (f"  ERROR {r['error']}" if "error" in r else ""))
    if lossy:
        # after traffic: what a lossy path does to pings once the tunnel has
        # had data to measure it by (alpaca's `fec: "auto"` needs that)
        cond["ping_after"] = ping(pair, tunnel.dst, count=200)
        cond["loss_counters"] = counter_delta(c0, pair.counters())


def bench_tunnel(tunnel: Tunnel, args, prefix: str, work: Path, res: dict, paths: int = 1) -> None:
    """Fills res as it goes (an interrupted run keeps what was measured). paths=2: the dual-path
    pair (only for a multipath tunnel)."""
    why = tunnel.available()
    if not why and args.wan is not None and tunnel.relay_ports is None:
        why = "raw TCP cannot cross the UDP relay of WAN mode"
    if why:
        log(f"{tunnel.name}: skipped ({why})")
        res.update({"available": False, "reason": why})
        return
    res.update({"available": True, "paths": paths, "versions": tunnel.versions(), "conditions": {}})
    pair = Pair(prefix, paths) if args.wan is None else WanPair(prefix, args, work, paths)
    try:
        res["default_cc"] = {s: pair.sh(s, ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]).strip()
                             for s in ("a", "b")}
        res["tcp_mem"] = {k: pair.sh("b", ["sysctl", "-n", f"net.ipv4.{k}"]).split() for k in ("tcp_wmem", "tcp_rmem")}
        if args.wan is not None:
            pair.relay(*tunnel.relay_ports)
            if paths == 2:
                pair.relay(*tunnel.relay_ports2, link=2)
            pair.set_loss(0, True)
        t0 = time.monotonic()
        tunnel.start(pair, work)
        if not wait_for(lambda: pair.run("b", ["ping", "-c1", "-W1", "-q", tunnel.dst]).returncode == 0, 30, 0.2):
            raise RuntimeError(f"no ping through {tunnel.name} within 30 s: {tunnel.log_tail()}")
        res["setup_s"] = round(time.monotonic() - t0, 2)
        if paths == 2:
            res["state_up"] = tunnel.wait_paths(pair, 2)
            log(f"{tunnel.name}: 2 paths live: -a {', '.join(Alpaca.live_paths(res['state_up'], 'a'))}; "
                f"-b {', '.join(Alpaca.live_paths(res['state_up'], 'b'))}")
        elif (st := tunnel.state(pair)) is not None:
            res["state_up"] = st
        log(f"{tunnel.name}: up after {res['setup_s']} s")
        if args.wan is None:
            clean = res["conditions"]["clean"] = {"offloads": "on", "loss": None, "offload_state": pair.offload_state()}
            measure_condition(pair, tunnel, args, QUICK_RUNS if args.quick else CLEAN_RUNS, False, clean)
            tunnel.check_alive()
            state = pair.offloads(False) if args.loss else None
            runs, offloads, matches = LOSS_RUNS, "off", "udp" if tunnel.udp_only else "all"
        else:   # the relay drops single datagrams whatever the offloads: leave them as they are
            state = pair.offload_state()
            runs, offloads, matches = WAN_RUNS, "on", "relay"
        for p in args.loss:
            pair.set_loss(p, tunnel.udp_only)
            where = f"WAN {args.wan:g} ms" if args.wan is not None else f"offloads off, {matches.upper()}"
            log(f"{tunnel.name}: {where}, loss {100 * p:g} %")
            cond = res["conditions"][f"loss-{p:g}"] = {
                "offloads": offloads, "loss": p, "loss_matches": matches, "offload_state": state}
            if args.wan is not None:
                cond["wan_delay_ms"] = args.wan
            measure_condition(pair, tunnel, args, QUICK_RUNS if args.quick else runs, True, cond)
            if args.wan is not None:
                cond["relay"] = pair.snapshot
            tunnel.check_alive()
        if (st := tunnel.state(pair)) is not None:
            res["state_end"] = st
        pair.clear_loss()
        tunnel.stop(pair)
        res["daemon_exit"] = {s: p.returncode for s, p in tunnel.daemons.items()}
    except Exception as e:   # noqa: BLE001 -- one tunnel failing must not lose the others' figures
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"{tunnel.name}: FAILED: {res['error']}")
    finally:
        for p in getattr(tunnel, "daemons", {}).values():
            pair.stop(p, signal.SIGTERM, timeout=5)
        if isinstance(tunnel, WireguardGo) and hasattr(tunnel, "ifname"):
            tunnel.stop(pair)   # also removes the control sockets
        pair.close()


def iperf_udp(pair: WanPair, rate: int, seconds: int) -> dict:
    """iperf3 -u from -b to the relay's address on -b's link; the server in -a gets what the relay forwards."""
    res: dict = {"target_mbit_s": rate, "seconds": seconds, "len": CAPACITY_LEN}
    srv = pair.popen("a", ["iperf3", "-s", "-1", "-B", UNDER_A, "-p", str(IPERF_PORT)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for(lambda: pair.run("a", ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]).stdout.strip(), 5, 0.05):
            res["error"] = "iperf3 server did not listen"
            return res
        c0, m0 = pair.counters(), machine_ticks()
        r = pair.run("b", ["iperf3", "-c", RELAY_B, "-p", str(IPERF_PORT), "-u", "-b", f"{rate}M",
                           "-l", str(CAPACITY_LEN), "-w", "4M", "-t", str(seconds), "-J"], timeout=seconds + 30)
        m1 = machine_ticks()
        res["relay"] = counter_delta(c0, pair.counters())
        res["machine_busy_pct"] = 100 * (m1["busy"] - m0["busy"]) / max(1, sum(m1.values()) - sum(m0.values()))
    finally:
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            pair.stop(srv, signal.SIGKILL, 5)
    try:
        end = json.loads(r.stdout).get("end", {})
    except ValueError:
        res["error"] = f"iperf3 gave no JSON: {r.stderr.strip()[-300:]}"
        return res
    sent, got = end.get("sum_sent", {}), end.get("sum_received", {})    # UDP too (iperf3 3.12)
    if not got.get("packets"):
        res["error"] = f"iperf3 UDP result without packets: {sorted(end)}"
        return res
    res.update({"sender_mbit_s": sent.get("bits_per_second", 0) / 1e6, "packets": got["packets"],
                "lost_packets": got.get("lost_packets"), "lost_pct": got.get("lost_percent"),
                "mbit_s": got["bits_per_second"] / 1e6})
    return res


def relay_capacity(args, prefix: str, work: Path) -> dict:
    """How many Mbit/s of CAPACITY_LEN-byte datagrams the relay (no loss, --wan delay) forwards,
    from iperf3 -u at rising rates. A step passes when the relay itself lost at most
    CAPACITY_MAX_LOSS % (its sockets' kernel drops, send errors): what the iperf3 server then
    loses in its own socket buffer is the receiver's limit on a shared 2-core machine, reported
    beside it (e2e)."""
    out: dict = {"method": f"iperf3 -u -l {CAPACITY_LEN} -w 4M -b RATE -t {args.capacity_seconds}, "
                           f"ns-b -> relay -> ns-a, delay {args.wan:g} ms, loss 0; pass = the relay lost at most "
                           f"{CAPACITY_MAX_LOSS:g} %", "steps": []}
    pair = WanPair(prefix, args, work)
    try:
        pair.forward_tcp(IPERF_PORT)
        pair.relay(IPERF_PORT, IPERF_PORT, None)
        pair.start_relay(0)
        fails = 0
        for rate in CAPACITY_RATES:
            r = iperf_udp(pair, rate, args.capacity_seconds)
            out["steps"].append(r)
            if "error" in r:
                log(f"relay capacity: {rate:5d} Mbit/s offered: ERROR {r['error']}")
                break
            way, cpu = r["relay"]["a"], r["relay"]["relay"]["cpu_s"]     # -b -> -a: on its way to -a
            lost = way["kernel_drops"] + way["lost"]
            r["relay_lost_pct"] = 100 * lost / max(1, way["seen"] + way["kernel_drops"])
            r["relay_mbit_s"] = way["forwarded"] * CAPACITY_LEN * 8 / args.capacity_seconds / 1e6
            r["relay_late_pct"] = 100 * way["late"] / max(1, way["seen"])
            r["relay_cpu_pct"] = 100 * cpu / args.capacity_seconds
            log(f"relay capacity: {rate:5d} Mbit/s offered: iperf3 sent {r['sender_mbit_s']:.0f}, relay forwarded "
                f"{r['relay_mbit_s']:.0f} (lost {r['relay_lost_pct']:.2f} %, late {r['relay_late_pct']:.2f} %, "
                f"CPU {r['relay_cpu_pct']:.0f} % of a core), iperf3 received {r['mbit_s']:.0f} "
                f"(lost {r['lost_pct']:.2f} %)")
            if r["relay_lost_pct"] <= CAPACITY_MAX_LOSS:
                out["max_mbit_s"] = max(out.get("max_mbit_s", 0), r["relay_mbit_s"])
                fails = 0
            else:
                fails += 1
                out["saturated_at_mbit_s"] = out.get("saturated_at_mbit_s") or r["sender_mbit_s"]
            if (r["lost_pct"] or 0) <= CAPACITY_MAX_LOSS:
                out["e2e_max_mbit_s"] = max(out.get("e2e_max_mbit_s", 0), r["mbit_s"])
            if fails == 2:
                break
        out["max_offered_mbit_s"] = max((r.get("sender_mbit_s", 0) for r in out["steps"]), default=0)
        pair.stop_relay()
    except Exception as e:   # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"relay capacity: FAILED: {out['error']}")
    finally:
        pair.close()
    return out


# ---------------------------------------------------------------- report

def get(res: dict, tunnel: str, cond: str, *path):
    v = res["tunnels"].get(tunnel, {}).get("conditions", {}).get(cond)
    for p in path:
        if not isinstance(v, dict):
            return None
        v = v.get(p)
    return v


def fmt(v, spec: str) -> str:
    """spec "mbit": one decimal below 10 (a collapsed stream still shows), none above."""
    if v is None:
        return "-"
    return format(v, (".1f" if abs(v) < 10 else ".0f") if spec == "mbit" else spec)


def columns(res: dict) -> list[str]:
    """The measured entries of res["tunnels"], in table order (a tunnel's 2-path entry after it)."""
    return [c for t in TUNNELS for c in (t, t + DUAL) if res["tunnels"].get(c, {}).get("available")]


def table(res: dict) -> str:
    tunnels = columns(res)
    dual = "alpaca" + DUAL in tunnels
    rows: list[tuple[str, list]] = []

    def add(label, values, spec, ratio=True, busy=None):
        cells = [fmt(v, spec) + ("*" if busy and busy[i] else " ") for i, v in enumerate(values)]
        a = dict(zip(tunnels, values))
        r = "-"
        if ratio and a.get("alpaca") is not None and a.get("wireguard-go"):
            r = f"{a['alpaca'] / a['wireguard-go']:.2f}"
        extra = []
        if dual:
            extra = ["-" if not ratio or a.get("alpaca" + DUAL) is None or not a.get("alpaca")
                     else f"{a['alpaca' + DUAL] / a['alpaca']:.2f}"]
        rows.append((label, cells + [r] + extra))

    conds = [c for c in ["clean"] + [f"loss-{p:g}" for p in res["args"]["loss"]]]
    for cond in conds:
        first = next((res["tunnels"][t]["conditions"].get(cond) for t in tunnels
                      if res["tunnels"][t].get("conditions", {}).get(cond)), None)
        if first is None:
            continue
        if cond == "clean":
            rows.append(("clean link, offloads on", None))
        elif first.get("wan_delay_ms") is not None:
            label = f"WAN {first['wan_delay_ms']:g} ms each way, {100 * first['loss']:g} % loss each way (relay)"
            rows.append((label, None))
        else:
            rows.append((f"offloads off, {100 * first['loss']:g} % loss each way", None))
        def busy(key, cond=cond):
            return [(get(res, t, cond, "runs", key, "busy_pct_before") or 0) > res["args"]["quiet_pct"]
                    for t in tunnels]
        run_keys = list(first["runs"])
        for key in run_keys:
            add(f"  {key} Mbit/s", [get(res, t, cond, "runs", key, "mbit_s") for t in tunnels], "mbit",
                busy=busy(key))
        key1 = run_key(1, "b2a", "default")
        add("  ping idle avg ms", [get(res, t, cond, "ping_idle", "avg_ms") for t in tunnels], ".3f")
        add(f"  ping load avg ms ({key1})", [get(res, t, cond, "runs", key1, "ping_load", "avg_ms")
                                              for t in tunnels], ".2f")
        add(f"  daemon CPU s/GB ({key1})", [get(res, t, cond, "runs", key1, "daemon_cpu_s_per_gb")
                                             for t in tunnels], ".1f", busy=busy(key1))
        add(f"  machine CPU s/GB ({key1})", [get(res, t, cond, "runs", key1, "machine_cpu_s_per_gb")
                                              for t in tunnels], ".1f", busy=busy(key1))
        if first.get("wan_delay_ms") is not None:
            add(f"  relay CPU % of a core ({key1})", [get(res, t, cond, "runs", key1, "relay_cpu_pct")
                                                      for t in tunnels], ".0f", ratio=False)
        if cond != "clean":
            add("  ping after load lost %", [get(res, t, cond, "ping_after", "loss_pct") for t in tunnels], ".1f",
                ratio=False)
            add("  ping after load avg ms", [get(res, t, cond, "ping_after", "avg_ms") for t in tunnels], ".3f")
            add("  ping idle lost %", [get(res, t, cond, "ping_idle", "loss_pct") for t in tunnels], ".0f",
                ratio=False)
            add("  measured drop %", [None if (x := get(res, t, cond, "loss_counters", "total", "drop_ratio")) is None
                                      else 100 * x for t in tunnels], ".2f", ratio=False)
            for link in ("link1", "link2") if dual else ():
                add(f"  measured drop % {link[:4]} {link[4:]}",
                    [None if (x := get(res, t, cond, "loss_counters", "links", link, "drop_ratio")) is None
                     else 100 * x for t in tunnels], ".2f", ratio=False)
    head = ["", *(LABELS.get(t, t) for t in tunnels), "alpaca/wg"] + (["2p/1p"] if dual else [])
    w0 = max(len(r[0]) for r in rows + [("", None)])
    widths = [max(len(head[i + 1]) + 1, 10) for i in range(len(head) - 1)]
    lines = [f"{'':{w0}}  " + "  ".join(f"{h + ' ':>{w}}" for h, w in zip(head[1:], widths))]
    if res["args"].get("wan") is not None:
        lines.insert(0, f"WAN mode: {res['args']['wan']:g} ms each way through bench/wan_relay.py; no raw column "
                        "(raw TCP cannot cross a UDP relay)")
    if res["args"].get("paths", 1) > 1:
        skipped = [t for t in TUNNELS if not CLASSES[t].multipath and t + DUAL in res["tunnels"]]
        lines.insert(0, "alpaca 2 paths: two links (" + ("two relays" if res["args"].get("wan") is not None
                                                         else "two veth pairs") +
                     "), each with the loss level of its row, every datagram sent on both; 2p/1p = alpaca 2 paths "
                     "/ alpaca" + (f"; no 2-path run for {', '.join(skipped)} (no multi-path)" if skipped else ""))
    for label, cells in rows:
        if cells is None:
            lines.append(label)
        else:
            lines.append(f"{label:{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def basis_condition(res: dict) -> str:
    """The condition of the headline ratio: the clean link, or in WAN mode the WAN without loss."""
    return "clean" if res["args"].get("wan") is None else "loss-0"


def ratio(res: dict, field: str) -> float | None:
    key, cond = run_key(1, "b2a", "default"), basis_condition(res)
    a = get(res, "alpaca", cond, "runs", key, field)
    w = get(res, "wireguard-go", cond, "runs", key, field)
    return a / w if a is not None and w else None


def dual_ratios(res: dict) -> dict | None:
    """--paths 2: alpaca's single b2a stream (default cc) at each loss level, with 2 paths and with
    1, divided by its 1-path figure without loss (the 0 % loss level: same offloads and RTT; the
    clean link when no 0 % level was measured). The goal: 2 paths at 30 % loss each >= 0.70."""
    if not res["tunnels"].get("alpaca" + DUAL, {}).get("available"):
        return None
    key = run_key(1, "b2a", "default")
    cond0 = "loss-0" if get(res, "alpaca", "loss-0", "runs", key, "mbit_s") is not None else "clean"
    base = get(res, "alpaca", cond0, "runs", key, "mbit_s")
    out: dict = {"basis": f"alpaca 1 path, {key}, {cond0}", "basis_condition": cond0, "basis_mbit_s": base,
                 "goal": "2 paths at 30 % >= 0.70",
                 "2 paths": {}, "1 path": {}}
    for cond in (["clean"] if res["args"].get("wan") is None else []) + [f"loss-{p:g}" for p in res["args"]["loss"]]:
        for col, label in (("alpaca" + DUAL, "2 paths"), ("alpaca", "1 path")):
            v = get(res, col, cond, "runs", key, "mbit_s")
            out[label][cond] = v / base if v is not None and base else None
    return out


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=None,
                    help="seconds per iperf3 run (default 10, 20 with --wan; 3 with --quick)")
    ap.add_argument("--idle", type=float, default=0.0,
                    help="seconds of silence before each iperf3 run (the tunnel as a user finds it; 0)")
    ap.add_argument("--quick", action="store_true",
                    help="one short single-stream run per tunnel (clean link only unless --loss is given)")
    ap.add_argument("--loss", default=None,
                    help=f"comma-separated drop probabilities (default {LOSS}, also with --wan; "
                         "none with --quick, 0 with --quick --wan; '' = no loss runs)")
    ap.add_argument("--wan", type=float, default=None, metavar="MS",
                    help="WAN mode: a relay namespace between the two that delays every datagram MS ms each way "
                         "and applies --loss (bench/wan_relay.py)")
    ap.add_argument("--seed", type=int, default=1, help="WAN mode: seed of the relay's loss decisions (1)")
    ap.add_argument("--relay-rt-prio", type=int, default=10,
                    help="WAN mode: run the relay as SCHED_FIFO with this priority (10; 0 = normal)")
    ap.add_argument("--capacity-seconds", type=int, default=5,
                    help="WAN mode: seconds per iperf3 UDP step of the relay capacity test (5; 0 = skip it)")
    ap.add_argument("--paths", type=int, default=1, choices=(1, 2),
                    help="2: after each tunnel's usual runs, measure it again on two links (two veth pairs, or "
                         "with --wan two relays), loss applied to each link on its own; alpaca only, it sends "
                         "on every path (static addresses crossed between the links); the other tunnels have no "
                         "multi-path and their 2-path entry is skipped (1)")
    ap.add_argument("--tunnels", default=",".join(TUNNELS),
                    help=f"subset of {','.join(TUNNELS)} (default all; openvpn and wg-udpspeeder are skipped when "
                         "not installed)")
    ap.add_argument("--out", default=None, help="JSON result (default bench/results/<timestamp>.json)")
    ap.add_argument("--quiet-pct", type=float, default=20.0,
                    help="before each run wait until the machine is under this busy %% ...")
    ap.add_argument("--quiet-max", type=float, default=10.0, help="... for at most this many seconds")
    ap.add_argument("--quiet-budget", type=float, default=60.0,
                    help="total seconds of such waiting over the whole run (default 60)")
    args = ap.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3 if args.quick else 20 if args.wan is not None else 10
    if args.loss is None:
        args.loss = "0" if args.quick and args.wan is not None else "" if args.quick else LOSS
    if args.wan is not None and args.wan < 0:
        ap.error("--wan must be >= 0")
    args.loss = [float(x) for x in args.loss.split(",") if x.strip()]
    if any(not 0 <= p < 1 for p in args.loss):
        ap.error("--loss values must be in [0, 1)")
    args.tunnels = [t.strip() for t in args.tunnels.split(",") if t.strip()]
    if bad := [t for t in args.tunnels if t not in TUNNELS]:
        ap.error(f"unknown tunnel(s) {bad}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/run.py needs root (network namespaces)")
    for tool in ("iperf3", "ping", "ip", "ss", "ethtool", "sysctl") + ((IPT,) if args.loss or args.wan else ()):
        if shutil.which(tool) is None:
            sys.exit(f"missing {tool} (apt-get install iperf3 iputils-ping iproute2 ethtool iptables procps)")

    main_pid = os.getpid()

    def on_term(signum, _frame):
        if os.getpid() != main_pid:     # a helper forked by pyroute2: die as if we had no handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # SIGINT too: a background job starts with it ignored
        signal.signal(sig, on_term)

    started = datetime.now(UTC)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    res: dict = {
        "date": started.isoformat(timespec="seconds"),
        "args": {"seconds": args.seconds, "quick": args.quick, "idle": args.idle, "loss": args.loss, "tunnels": args.tunnels,
                 "quiet_pct": args.quiet_pct, "quiet_max": args.quiet_max, "quiet_budget": args.quiet_budget,
                 "wan": args.wan, "seed": args.seed, "relay_rt_prio": args.relay_rt_prio,
                 "capacity_seconds": args.capacity_seconds, "paths": args.paths},
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "machine": platform.machine(),
                 "iperf3": subprocess.run(["iperf3", "--version"], capture_output=True,
                                          text=True, check=False).stdout.split("\n")[0].strip()},
        "topology": {"underlay": f"{UNDER_A}/24 <-veth-> {UNDER_B}/24", "wireguard-go": f"{WG_A} <-> {WG_B}, mtu 1420",
                     "openvpn": f"{OVPN_A} <-> {OVPN_B} (point to point), UDP {OVPN_PORT}, AES-256-GCM, no DCO, "
                                "tun-mtu 1500",
                     "alpaca": f"server 1.1 {ALPACA_A} (ns a) <-> client 16.1 {ALPACA_B} (ns b), default mtu"},
        "tunnels": {},
    }
    if args.wan is not None:
        res["topology"].update({
            "underlay": f"{UNDER_A}/24 <-veth-> {RELAY_A}/24 relay ns {RELAY_B}/24 <-veth-> {WAN_B}/24, no routing",
            "relay": f"bench/wan_relay.py, {args.wan:g} ms each way, loss in each direction, SCHED_FIFO "
                     f"{args.relay_rt_prio}, tunnel endpoints at {RELAY_A} (from a) and {RELAY_B} (from b)",
            "wg-udpspeeder": f"wireguard-go mtu {SPEEDER_WG_MTU} -> speederv2 -f{SPEEDER_FEC} on both sides"})
    if args.paths == 2:
        res["topology"]["alpaca" + DUAL] = (
            f"link 1 {UNDER_A}/24 <-veth-> {UNDER_B}/24, link 2 {UNDER2_A}/24 <-veth-> {UNDER2_B}/24; "
            f"secrets.txt in a: 16.1 at {UNDER2_B}, in b: 1.1 at {UNDER_A}; loss rules on both links"
            if args.wan is None else
            f"link 1 through relay {RELAY_A} / {RELAY_B}, link 2 {UNDER2_A}/24 <-veth-> {RELAY2_A}/24 relay 2 "
            f"{RELAY2_B}/24 <-veth-> {WAN2_B}/24; secrets.txt in a: 16.1 at {RELAY2_A}, in b: 1.1 at {RELAY_B}; "
            "each relay drops on its own")
    prefix = f"ab{os.getpid() % 100000}"
    work = Path(tempfile.mkdtemp(prefix="alpaca-bench-"))
    t_start = time.monotonic()
    interrupted = False
    try:
        if args.wan is not None and args.capacity_seconds > 0:
            log("== relay capacity")
            res["relay_capacity"] = relay_capacity(args, f"{prefix}c", work)
        for i, name in enumerate(args.tunnels):
            log(f"== {name}")
            bench_tunnel(CLASSES[name](), args, f"{prefix}{i}", work, res["tunnels"].setdefault(name, {}))
            if args.paths == 2:
                entry = res["tunnels"].setdefault(name + DUAL, {})
                if CLASSES[name].multipath:
                    log(f"== {name}, 2 paths")
                    bench_tunnel(CLASSES[name](), args, f"{prefix}{i}p", work, entry, paths=2)
                else:
                    entry.update({"available": False, "paths": 2,
                                  "reason": "no multi-path (one peer address per tunnel): --paths 2 measures alpaca only"})
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaned up; partial results follow")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    res["ratios"] = {"alpaca/wireguard-go throughput": ratio(res, "mbit_s"),
                     "alpaca/wireguard-go daemon CPU s/GB": ratio(res, "daemon_cpu_s_per_gb"),
                     "basis": f"{run_key(1, 'b2a', 'default')}, " + (
                         "clean link, offloads on" if args.wan is None else f"WAN {args.wan:g} ms each way, no loss")}
    if (dual := dual_ratios(res)) is not None:
        res["ratios"]["alpaca 2 paths"] = dual
    print(table(res))
    cap = res.get("relay_capacity")
    if cap:
        limit = (f"saturated at {cap['saturated_at_mbit_s']:.0f} offered" if cap.get("saturated_at_mbit_s")
                 else f"not saturated: iperf3 offered at most {cap.get('max_offered_mbit_s', 0):.0f}")
        print(f"relay capacity: forwards {fmt(cap.get('max_mbit_s'), '.0f')} Mbit/s of {CAPACITY_LEN}-byte datagrams "
              f"losing at most {CAPACITY_MAX_LOSS:g} % ({limit}; end to end through iperf3 "
              f"{fmt(cap.get('e2e_max_mbit_s'), '.0f')} Mbit/s)" + (f"; ERROR {cap['error']}" if cap.get("error") else ""))
    print(f"\n{res['date']}  {args.seconds} s per run, total {res['elapsed_s']} s; JSON: {out}")
    print("b2a = ns-b sends to ns-a, a2b = iperf3 -R; default cc = " +
          ", ".join(sorted({str(v.get('default_cc', {}).get('b')) for v in res["tunnels"].values()
                            if v.get("available")})))
    runs = [r for t in res["tunnels"].values() for c in t.get("conditions", {}).values()
            for r in c.get("runs", {}).values()]
    busy = [r for r in runs if r.get("busy_pct_before", 0) > args.quiet_pct]
    res["noisy_runs"] = len(busy)
    if busy:
        print(f"note: * = one of the {len(busy)} of {len(runs)} runs that started while the machine was over "
              f"{args.quiet_pct:g} % busy with other load (busy_pct_before in the JSON)")
    for name, t in res["tunnels"].items():
        for cname, c in t.get("conditions", {}).items():
            if (c.get("loss_counters") or {}).get("total", {}).get("oversize"):
                print(f"warning: {name} {cname}: packets over 1500 B reached the loss rule (offloads not off?)")
        if t.get("available") is False and not (name.endswith(DUAL) and not CLASSES[name[:-len(DUAL)]].multipath):
            print(f"{name}: skipped ({t['reason']})")
        if t.get("error"):
            print(f"{name}: ERROR {t['error']}")
    if dual is not None:
        def pct(cond: str) -> str:
            return "clean" if cond == "clean" else f"{100 * float(cond[5:]):g} %"
        print(f"alpaca {run_key(1, 'b2a', 'default')} / its 1-path {pct(dual['basis_condition'])} figure "
              f"({fmt(dual['basis_mbit_s'], 'mbit')} Mbit/s): 2 paths " +
              ", ".join(f"{pct(c)} {fmt(v, '.2f')}" for c, v in dual["2 paths"].items()) + "; 1 path " +
              ", ".join(f"{pct(c)} {fmt(v, '.2f')}" for c, v in dual["1 path"].items()) +
              " (goal: 2 paths at 30 % >= 0.70)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    cpu = res["ratios"]["alpaca/wireguard-go daemon CPU s/GB"]
    print(f"alpaca/wireguard-go daemon CPU s/GB ratio: {fmt(cpu, '.2f') if cpu is not None else 'n/a'}")
    r = res["ratios"]["alpaca/wireguard-go throughput"]
    print(f"alpaca/wireguard-go throughput ratio: {format(r, '.2f') if r is not None else 'n/a'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
