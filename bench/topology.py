"""The benchmark's topology: two namespaces joined by one or two veth links, or by WAN relays (wan_relay.py)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import (BIG, CNT, DROP, IPT, OFFLOAD_RX, OFFLOAD_SHOW, OFFLOAD_TX, RELAY2_A, RELAY2_B, RELAY_A,
                    RELAY_B, ROOT, UNDER2_A, UNDER2_B, UNDER6_A, UNDER6_B, UNDER_A, UNDER_B, WAN2_B, WAN_B)
from pyroute2 import NetNS

from alpaca.lab.testbed import Testbed, add_address, wait_for


# ---------------------------------------------------------------- topology

class Pair(Testbed):
    """Two namespaces <prefix>-a and <prefix>-b joined by one veth pair (eth0 on each side), or
    with paths=2 by two (eth0: link 1, eth1: link 2); unlike Testbed, no hub namespace and no
    bridge. Testbed's popen/run/stop/close are reused. Link 1 has IPv6 addresses too (UNDER6_A,
    UNDER6_B); `ipt`: the iptables of the family the loss rules apply to."""

    def __init__(self, prefix: str, paths: int = 1, ipt: str = IPT):   # not calling Testbed.__init__ (it builds a hub)
        self.prefix, self.subnet, self.hub = prefix, None, None
        self.hosts, self.namespaces, self.procs, self._ifcount = {}, [], [], 0
        self.paths, self.ipt = paths, ipt
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
        for side, address in (("a", UNDER6_A), ("b", UNDER6_B)):
            with NetNS(self.ns(side)) as ns:
                add_address(ns, ns.link_lookup(ifname="eth0")[0], address, 64)
        self.check_ping("b", UNDER6_A)
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
                self.sh(side, [self.ipt, "-w", "-A", "INPUT", *spec])
                self._rules.append((side, spec))

    def clear_loss(self) -> None:
        for side, spec in getattr(self, "_rules", []):
            self.sh(side, [self.ipt, "-w", "-D", "INPUT", *spec], check=False)
        self._rules = []

    def counters(self) -> dict:
        """{"a": {"seen", "oversize", "dropped"}, "b": {...}} packets counted by our rules on link 1
        (arriving in -a, in -b); "a-link2", "b-link2" the same on link 2 with --paths 2."""
        out, listing = {}, {}
        for key, side, dev in self.loss_ifaces():
            if side not in listing:
                listing[side] = self.sh(side, [self.ipt, "-w", "-L", "INPUT", "-v", "-n", "-x"]).splitlines()
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
