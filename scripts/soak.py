#!/usr/bin/env python3
"""Soak test: four peers in network namespaces, traffic flowing, and a fault
every few seconds; afterwards the host must be as it was.

    .venv/bin/python scripts/soak.py [--minutes 10] [--seed S] [--interval 5]
                                     [--json FILE] [--keep]

Needs root, /dev/net/tun, ping, iptables-legacy and ip. Builds its own
namespaces (unique prefix `sk<pid>`), sends traffic only between them, ends
only the processes it started (by PID) and removes everything, also when it
fails or is interrupted (SIGINT/SIGTERM).

Mesh: the lab's standard one (alpaca/lab/mesh.py), run by alpaca.lab.daemons:
servers 1.1 (s1) and 1.2 (s2), client 16.1 (c1: gateway 1.1, forwarders 1.1
and 1.2), client 16.2 (c2: gateway 1.1).
Traffic: `ping -i 0.05` from each client to 10.17.1.1 (the recovery probe),
and a TCP stream from each client to 10.17.1.1 (alpaca.lab.tcp_stream).

Faults, one at a time, one every --interval seconds (random, --seed):
  sigterm   SIGTERM a daemon, start it again at once
  sigkill   SIGKILL a daemon, start it again at once (it must clean up what
            the killed one left)
  rewrite   rewrite a daemon's secrets.txt editor-style (new file renamed
            over it), same content
  readd     remove one peer line from a daemon's secrets.txt (rename), wait
            1.5-3 s, put it back
  sighup    SIGHUP a daemon (reload)
  cut       DROP all traffic between two peers' underlay addresses
            (iptables-legacy in one of the two namespaces) for 2-4 s
  bounce    `ip link set eth0 down` in a namespace for 1-3 s, then up
In the second half of the run one server and one client (the "steady" pair,
chosen by the seed) are no longer restarted, so their fd count and RSS are
watched over a long stretch.

Recovery: the time from the fault (the kill for sigterm/sigkill, the write
for rewrite/sighup, the restore for readd/cut/bounce) until both clients'
pings get a reply again; each must be <= 5 s (RECOVERY_LIMIT).

At the end every daemon is stopped with SIGTERM (exit status 0 expected) and
each namespace is compared with its state before the first start: `ip rule`,
`ip route show table all` (v4 and v6), the rules of `iptables-legacy-save`,
TUN devices, net.ipv4.ip_forward. Each daemon's open fds (/proc/PID/fd) and
VmRSS are sampled every 2 s; for every daemon process that lived at least
WARMUP + 30 s, the median of its last 5 samples must not exceed the median of
its first 5 samples after WARMUP by more than FD_MARGIN fds and RSS_MARGIN.
Logs must hold no traceback.

Prints a summary (faults by kind, recovery max/p95, outages, fd/RSS trend,
TCP stream stalls) and exits 0 when every check passed, 1 otherwise (130
when interrupted). Figures from a 10-minute run are in docs/limits.md.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from alpaca.lab.daemons import Daemon, Mesh, lab_module
from alpaca.lab.mesh import STANDARD as PEERS    # name: (host number, peer ID, config)
from alpaca.lab.testbed import Testbed, missing_for_lab, wait_for

TARGET = "10.17.1.1"
TCP_PORT = 5300
GROUP = "soak"

RECOVERY_LIMIT = 5.0        # seconds from a fault until traffic flows again
RECOVERY_WAIT = 20.0        # how long we wait before calling it "not recovered"
WARMUP = 20.0               # seconds after a daemon's start before its fd/RSS baseline
SAMPLE_INTERVAL = 2.0
FD_MARGIN = 2               # open fds a daemon may gain over its life (transient netlink sockets)
RSS_MARGIN_KIB = 8 * 1024   # RSS a daemon may gain over its life

SERVERS, CLIENTS = ("s1", "s2"), ("c1", "c2")
CUT_PAIRS = [("c1", "s1"), ("c1", "s2"), ("c2", "s1"), ("s2", "s1")]
WEIGHTS = {"sigterm": 2, "sigkill": 2, "rewrite": 1, "readd": 1.5, "sighup": 0.5, "cut": 2, "bounce": 1.5}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ daemons

@dataclass
class Instance:
    """One process of a daemon, with its (time, open fds, RSS KiB) samples."""
    pid: int
    started: float
    ended: float | None = None
    samples: list[tuple[float, int, int]] = field(default_factory=list)


class SoakDaemon(Daemon):
    """A lab Daemon that remembers each of its processes and samples them."""

    def __init__(self, *args):
        super().__init__(*args)
        self.instances: list[Instance] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        with open(self.log_path, "ab") as logf:
            logf.write(f"=== soak: start at {time.strftime('%H:%M:%S')} ===\n".encode())
        with self.lock:
            super().start()
            self.instances.append(Instance(self.proc.pid, time.time()))

    def end(self, sig: int) -> tuple[int | None, float]:
        """Stop this process (SIGKILL after 15 s); its exit status and how long it took."""
        t0 = time.time()
        with self.lock:
            proc, inst = self.proc, self.instances[-1]
            self.proc = None
        rc = self.mesh.tb.stop(proc, sig, timeout=15)
        inst.ended = time.time()
        return rc, inst.ended - t0

    def sample(self) -> None:
        with self.lock:
            proc, inst = self.proc, (self.instances[-1] if self.instances else None)
        if proc is None or proc.poll() is not None:
            return
        try:
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            return
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        inst.samples.append((time.time(), fds, rss))


# ------------------------------------------------------------------ traffic

class Pinger:
    """ping -D from a client to TARGET; keeps the (wall-clock) time of every reply."""

    def __init__(self, soak: Soak, name: str):
        self.soak, self.name = soak, name
        self.replies: list[float] = []
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pattern = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from")
        while not self.stopping:
            self.proc = self.soak.tb.popen(self.name, ["ping", "-n", "-D", "-O", "-i", "0.05", "-W", "1", TARGET],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in self.proc.stdout:
                m = pattern.match(line)
                if m:
                    self.replies.append(float(m.group(1)))
            self.proc.wait()
            if not self.stopping:
                self.restarts += 1
                time.sleep(0.2)

    def first_reply_after(self, t: float) -> float | None:
        i = bisect.bisect_right(self.replies, t)
        return self.replies[i] if i < len(self.replies) else None

    def longest_gap(self, t0: float, t1: float) -> float:
        i = max(bisect.bisect_left(self.replies, t0) - 1, 0)
        j = bisect.bisect_right(self.replies, t1)
        window = self.replies[i:j + 1]
        return max((b - a for a, b in itertools.pairwise(window)), default=float("inf"))

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None:
            self.soak.tb.stop(self.proc)
        self.thread.join(5)


class Stream:
    """soak_stream.py sink/source; keeps its per-second counter lines."""

    def __init__(self, soak: Soak, name: str, argv: list[str]):
        self.name = name
        self.points: list[tuple[float, int, int]] = []
        self.proc = soak.tb.popen(name, lab_module("alpaca.lab.tcp_stream", *argv),
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) == 3:
                self.points.append((float(parts[0]), int(parts[1]), int(parts[2])))

    def longest_stall(self) -> float:
        """Longest time the byte counter did not move (after the first byte)."""
        longest, since, last = 0.0, None, None
        for t, total, _ in self.points:
            if last is None or total != last:
                if since is not None:
                    longest = max(longest, t - since)
                since, last = t, total
        if since is not None and self.points:
            longest = max(longest, self.points[-1][0] - since)
        return longest


# ------------------------------------------------------------------ host state

def host_state(tb: Testbed, name: str) -> dict[str, list[str]]:
    state = {}
    for key, argv in (("rules4", ["ip", "-4", "rule"]), ("rules6", ["ip", "-6", "rule"]),
                      ("routes4", ["ip", "-4", "route", "show", "table", "all"]),
                      ("routes6", ["ip", "-6", "route", "show", "table", "all"]),
                      ("tun", ["ip", "-o", "link", "show", "type", "tun"])):
        state[key] = sorted(line for line in tb.run(name, argv).stdout.splitlines() if line.strip())
    # rules and non-ACCEPT chain policies; a table that was merely loaded is no change
    ipt = tb.run(name, ["iptables-legacy-save"]).stdout.splitlines()
    state["iptables"] = sorted(re.sub(r"\s*\[\d+:\d+\]", "", line) for line in ipt
                               if line.startswith("-A") or (line.startswith(":") and " ACCEPT" not in line))
    state["ip_forward"] = [tb.run(name, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()]
    return state


def settled_state(tb: Testbed, name: str) -> dict[str, list[str]]:
    """The state once the fresh link has its IPv6 link-local address (DAD)."""
    state = host_state(tb, name)
    deadline = time.time() + 10
    while time.time() < deadline:
        time.sleep(1.0)
        again = host_state(tb, name)
        if again == state and any(line.startswith("local fe80") for line in state["routes6"]):
            break
        state = again
    return state


def state_diff(before: dict, after: dict) -> list[str]:
    out = []
    for key, lines in before.items():
        gone = [line for line in lines if line not in after[key]]
        new = [line for line in after[key] if line not in lines]
        out += [f"{key}: - {line}" for line in gone] + [f"{key}: + {line}" for line in new]
    return out


# ------------------------------------------------------------------ faults

@dataclass
class Fault:
    n: int
    kind: str
    target: str
    detail: str
    t_fault: float
    t_ref: float = 0.0
    recovery: dict[str, float | None] = field(default_factory=dict)
    outage: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> float:
        values = list(self.recovery.values())
        return float("inf") if any(v is None for v in values) else max(values, default=0.0)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.prefix = f"sk{os.getpid() % 100000}"
        self.workdir = Path(tempfile.mkdtemp(prefix="alpaca-soak-"))
        self.mesh: Mesh | None = None
        self.tb: Testbed | None = None
        self.daemons: dict[str, SoakDaemon] = {}
        self.pingers: dict[str, Pinger] = {}
        self.streams: list[Stream] = []
        self.cuts: list[tuple[str, list[str]]] = []     # (namespace, iptables rule) currently in place
        self.downs: list[str] = []                       # namespaces whose eth0 is down
        self.faults: list[Fault] = []
        self.failures: list[str] = []
        self.ip: dict[str, str] = {}
        self.sampling = True
        self.before: dict[str, dict] = {}

    # -------------------------------------------------------------- setup
    def build(self) -> None:
        self.mesh = Mesh(Testbed(self.prefix), self.workdir, defaults={"group": GROUP}, daemon_class=SoakDaemon)
        self.tb, self.daemons, self.ip = self.mesh.tb, self.mesh.peers, self.mesh.ip
        self.mesh.add_topology(PEERS)
        for name in PEERS:
            self.before[name] = settled_state(self.tb, name)
        self.mesh.start_all(timeout=15)
        threading.Thread(target=self._sampler, daemon=True).start()
        self.pingers = {c: Pinger(self, c) for c in CLIENTS}
        self.streams.append(Stream(self, "s1", ["sink", "0.0.0.0", str(TCP_PORT)]))
        for c in CLIENTS:
            self.streams.append(Stream(self, c, ["source", TARGET, str(TCP_PORT)]))
        t0 = time.time()
        if not wait_for(lambda: all(p.first_reply_after(t0) for p in self.pingers.values()), 20):
            raise RuntimeError("no traffic through the mesh after start")

    def _sampler(self) -> None:
        while self.sampling:
            for daemon in list(self.daemons.values()):
                daemon.sample()
            time.sleep(SAMPLE_INTERVAL)

    # -------------------------------------------------------------- faults
    def restart(self, fault: Fault, sig: int) -> None:
        daemon = self.daemons[fault.target]
        rc, took = daemon.end(sig)
        if sig == signal.SIGTERM:
            if rc != 0:
                self.fail(f"fault {fault.n}: {fault.target} exited with {rc} on SIGTERM")
            if took > 5:
                self.fail(f"fault {fault.n}: {fault.target} took {took:.1f} s to stop on SIGTERM")
        fault.notes.append(f"stopped in {took:.2f} s, rc {rc}")
        daemon.start()

    def do_fault(self, fault: Fault) -> None:
        kind, rng = fault.kind, self.rng
        if kind in ("sigterm", "sigkill"):
            self.restart(fault, signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
            fault.t_ref = fault.t_fault
        elif kind == "rewrite":
            self.daemons[fault.target].write_secrets(self.daemons[fault.target].secrets_lines)
            fault.t_ref = time.time()
        elif kind == "sighup":
            proc = self.daemons[fault.target].proc
            proc.send_signal(signal.SIGHUP)
            fault.t_ref = time.time()
        elif kind == "readd":
            daemon = self.daemons[fault.target]
            others = [line for line in daemon.secrets_lines if line.split()[0] != daemon.id]
            victim = rng.choice(others)
            fault.detail = f"peer {victim.split()[0]} removed from {fault.target}'s secrets.txt"
            daemon.write_secrets([line for line in daemon.secrets_lines if line != victim])
            time.sleep(rng.uniform(1.5, 3.0))
            daemon.write_secrets(daemon.secrets_lines)
            fault.t_ref = time.time()
        elif kind == "cut":
            a, b = fault.target.split("-")
            where, other = (a, b) if rng.random() < 0.5 else (b, a)
            rules = [["-I", "INPUT", "-s", self.ip[other], "-j", "DROP"],
                     ["-I", "OUTPUT", "-d", self.ip[other], "-j", "DROP"]]
            fault.detail = f"{a}<->{b} dropped in {where}"
            for rule in rules:
                self.tb.run(where, ["iptables-legacy", "-w", *rule], check=True)
                self.cuts.append((where, rule))
            time.sleep(rng.uniform(2.0, 4.0))
            self.uncut()
            fault.t_ref = time.time()
        elif kind == "bounce":
            self.downs.append(fault.target)
            self.tb.run(fault.target, ["ip", "link", "set", "eth0", "down"], check=True)
            time.sleep(rng.uniform(1.0, 3.0))
            self.tb.run(fault.target, ["ip", "link", "set", "eth0", "up"], check=True)
            self.downs.remove(fault.target)
            fault.t_ref = time.time()

    def uncut(self) -> None:
        while self.cuts:
            where, rule = self.cuts.pop()
            self.tb.run(where, ["iptables-legacy", "-w", "-D", *rule[1:]])

    def pick(self, steady: set[str], second_half: bool) -> tuple[str, str]:
        kinds = list(WEIGHTS)
        kind = self.rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
        names = list(PEERS)
        if kind in ("sigterm", "sigkill") and second_half:
            names = [n for n in names if n not in steady]
        if kind == "cut":
            return kind, "-".join(self.rng.choice(CUT_PAIRS))
        return kind, self.rng.choice(names)

    def wait_recovery(self, fault: Fault) -> None:
        deadline = fault.t_ref + RECOVERY_WAIT
        while time.time() < deadline:
            if all(p.first_reply_after(fault.t_ref) for p in self.pingers.values()):
                break
            time.sleep(0.05)
        for name, pinger in self.pingers.items():
            first = pinger.first_reply_after(fault.t_ref)
            fault.recovery[name] = None if first is None else round(first - fault.t_ref, 3)
            fault.outage[name] = round(pinger.longest_gap(fault.t_fault - 0.5, first or time.time()), 3)

    def check_alive(self) -> None:
        for daemon in self.daemons.values():
            proc = daemon.proc
            if proc is not None and proc.poll() is not None:
                daemon.instances[-1].ended = time.time()
                self.fail(f"{daemon.name} (pid {proc.pid}) exited by itself with {proc.returncode}; log tail:\n"
                          + daemon.log_text()[-1500:])
                daemon.proc = None
                daemon.start()

    def fail(self, message: str) -> None:
        log(f"FAIL: {message}")
        self.failures.append(message)

    def run_faults(self) -> None:
        start = time.time()
        end = start + self.args.minutes * 60
        steady = {self.rng.choice(SERVERS), self.rng.choice(CLIENTS)}
        self.steady = steady
        log(f"fault loop for {self.args.minutes} min, seed {self.args.seed}; steady in the second half: "
            f"{', '.join(sorted(steady))}")
        next_at = start + 2.0
        n = 0
        while True:
            now = time.time()
            if now >= end:
                break
            if now < next_at:
                time.sleep(min(next_at - now, 0.2))
                continue
            n += 1
            second_half = now >= start + (end - start) / 2
            kind, target = self.pick(steady, second_half)
            fault = Fault(n, kind, target, "", time.time())
            self.do_fault(fault)
            self.wait_recovery(fault)
            self.faults.append(fault)
            rec = ", ".join(f"{k} {'never' if v is None else f'{v:.2f} s'}" for k, v in fault.recovery.items())
            log(f"#{n} {kind} {target} {fault.detail} {'; '.join(fault.notes)} -> recovered: {rec}")
            if fault.worst > RECOVERY_LIMIT:
                self.fail(f"fault {n} ({kind} {target} {fault.detail}): recovery {rec} (limit {RECOVERY_LIMIT} s)")
            self.check_alive()
            next_at = max(time.time() + 1.0, fault.t_fault + self.args.interval * self.rng.uniform(0.6, 1.4))

    # -------------------------------------------------------------- the end
    def finish(self) -> dict:
        t_end = time.time()
        statuses = {}
        for name, daemon in self.daemons.items():
            try:
                statuses[name] = daemon.status()
            except RuntimeError:
                statuses[name] = None
        for daemon in self.daemons.values():
            daemon.sample()
        self.sampling = False
        for pinger in self.pingers.values():
            pinger.stop()
        for stream in self.streams:
            self.tb.stop(stream.proc)
        for name, daemon in self.daemons.items():
            if daemon.proc is None:
                continue
            rc, _ = daemon.end(signal.SIGTERM)
            if rc != 0:
                self.fail(f"{name} exited with {rc} on the final SIGTERM")
        self.uncut()
        leaks = {}
        for name in PEERS:
            # a bounced link gets its IPv6 link-local address back only after DAD
            diff = wait_for(lambda n=name: state_diff(self.before[n], host_state(self.tb, n)) or None, 5) or []
            if diff:
                leaks[name] = diff
            if diff:
                self.fail(f"{name}: host state differs from before the first start:\n  " + "\n  ".join(diff))
        trends = self.trends(t_end)
        sink = self.streams[0]
        if not sink.points or sink.points[-1][1] == 0:
            self.fail("the TCP sink on s1 received nothing")
        logs = {}
        for name, daemon in self.daemons.items():
            text = daemon.log_text()
            lines = [line for line in text.splitlines() if not line.startswith("=== soak")]
            if "Traceback" in text:
                self.fail(f"{name}: traceback in the log:\n" + text[text.index("Traceback"):][:3000])
            errors = [line for line in lines if " ERROR " in line]
            logs[name] = {"lines": len(lines), "per_minute": round(len(lines) / (self.args.minutes or 1), 1),
                          "errors": errors[:20], "warnings": sum(" WARNING " in line for line in lines)}
        return {"statuses": statuses, "leaks": leaks, "trends": trends, "logs": logs}

    def trends(self, t_end: float) -> list[dict]:
        out = []
        for name, daemon in self.daemons.items():
            for inst in daemon.instances:
                samples = [s for s in inst.samples if s[0] >= inst.started + WARMUP]
                life = (inst.ended or t_end) - inst.started
                if life < WARMUP + 30 or len(samples) < 10:
                    continue
                first, last = samples[:5], samples[-5:]
                fd0, fd1 = statistics.median(s[1] for s in first), statistics.median(s[1] for s in last)
                rss0, rss1 = statistics.median(s[2] for s in first), statistics.median(s[2] for s in last)
                span_min = (last[-1][0] - first[0][0]) / 60
                row = {"daemon": name, "pid": inst.pid, "life_s": round(life), "fds": [fd0, fd1],
                       "rss_kib": [rss0, rss1],
                       "rss_kib_per_min": round((rss1 - rss0) / span_min, 1) if span_min else 0,
                       "fds_max": max(s[1] for s in samples), "rss_max_kib": max(s[2] for s in samples)}
                out.append(row)
                if fd1 - fd0 > FD_MARGIN:
                    self.fail(f"{name} pid {inst.pid}: open fds grew {fd0:g} -> {fd1:g} over {life:.0f} s")
                if rss1 - rss0 > RSS_MARGIN_KIB:
                    self.fail(f"{name} pid {inst.pid}: RSS grew {rss0:g} -> {rss1:g} KiB over {life:.0f} s")
        if not any(row["life_s"] >= WARMUP + 30 for row in out):
            self.fail("no daemon lived long enough to check fd/RSS growth (run longer)")
        return out

    def summary(self, extra: dict) -> dict:
        by_kind: dict[str, list[Fault]] = {}
        for f in self.faults:
            by_kind.setdefault(f.kind, []).append(f)
        recoveries = [f.worst for f in self.faults]
        finite = [r for r in recoveries if r != float("inf")]
        restarts = {name: len(d.instances) - 1 for name, d in self.daemons.items()}
        print("\n================ soak summary ================")
        print(f"run: {self.args.minutes} min, seed {self.args.seed}, {len(self.faults)} faults, "
              f"restarts per daemon {restarts}, steady pair {sorted(self.steady)}")
        print(f"{'fault':10} {'count':>5} {'recovery max':>13} {'p95':>7} {'median':>7} {'outage max':>11}")
        for kind in WEIGHTS:
            faults = by_kind.get(kind, [])
            rec = [f.worst for f in faults]
            out = [max(f.outage.values()) for f in faults]
            if faults:
                print(f"{kind:10} {len(faults):5d} {max(rec):12.2f}s {percentile(rec, 95):6.2f}s "
                      f"{statistics.median(rec):6.2f}s {max(out):10.2f}s")
        if recoveries:
            print(f"{'all':10} {len(recoveries):5d} {max(recoveries):12.2f}s {percentile(recoveries, 95):6.2f}s "
                  f"{statistics.median(recoveries):6.2f}s  (limit {RECOVERY_LIMIT} s)")
        print(f"fd / RSS of daemons that lived >= {WARMUP + 30:.0f} s (median of first 5 samples after "
              f"{WARMUP:.0f} s warm-up -> last 5):")
        for row in extra["trends"]:
            print(f"  {row['daemon']} pid {row['pid']:>7} lived {row['life_s']:4d} s: fds {row['fds'][0]:g} -> "
                  f"{row['fds'][1]:g} (max {row['fds_max']}), RSS {row['rss_kib'][0] / 1024:.1f} -> "
                  f"{row['rss_kib'][1] / 1024:.1f} MiB ({row['rss_kib_per_min']:+.0f} KiB/min, max "
                  f"{row['rss_max_kib'] / 1024:.1f})")
        for stream in self.streams:
            if stream.points:
                _, total, conns = stream.points[-1]
                print(f"TCP {stream.name}: {total / 2**20:.0f} MiB, {conns} connection(s), longest stall "
                      f"{stream.longest_stall():.1f} s")
        print("ping restarts: " + ", ".join(f"{n} {p.restarts}" for n, p in self.pingers.items()))
        print("log lines: " + ", ".join(f"{n} {v['lines']} ({v['per_minute']}/min, {len(v['errors'])} errors)"
                                        for n, v in extra["logs"].items()))
        for name, v in extra["logs"].items():
            for line in v["errors"][:5]:
                print(f"  {name}: {line}")
        print("host state after the final SIGTERM: " + ("DIFFERENT" if extra["leaks"] else "as before"))
        print(f"result: {'PASS' if not self.failures else 'FAIL'} ({len(self.failures)} failure(s))")
        for failure in self.failures:
            print(f"  - {failure.splitlines()[0]}")
        return {
            "minutes": self.args.minutes, "seed": self.args.seed, "steady": sorted(self.steady),
            "faults": [asdict(f) | {"worst": f.worst} for f in self.faults],
            "recovery": {"max": max(finite, default=None), "p95": percentile(finite, 95) if finite else None,
                         "unrecovered": len(recoveries) - len(finite)},
            "restarts": restarts, "failures": self.failures,
            "tcp": [{"name": s.name, "points": len(s.points), "bytes": s.points[-1][1] if s.points else 0,
                     "connections": s.points[-1][2] if s.points else 0, "longest_stall": s.longest_stall()}
                    for s in self.streams],
            **{k: v for k, v in extra.items() if k != "statuses"},
            "drops": {n: (s or {}).get("drops") for n, s in extra["statuses"].items()},
        }

    def close(self) -> None:
        self.sampling = False
        for pinger in self.pingers.values():
            pinger.stopping = True
        if self.mesh is None:
            return
        try:
            for where in list(self.downs):
                self.tb.run(where, ["ip", "link", "set", "eth0", "up"])
            self.uncut()
        except (OSError, subprocess.SubprocessError) as e:
            log(f"cleanup: {e} (the namespaces are removed anyway)")
        # SIGTERM to the daemons; the testbed SIGKILLs whatever else we started (by PID), removes the namespaces
        self.mesh.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--interval", type=float, default=5.0, help="mean seconds between faults")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if missing_for_lab():
        print(f"soak.py {missing_for_lab()}", file=sys.stderr)
        return 2
    for tool in ("ping", "ip", "iptables-legacy", "iptables-legacy-save"):
        if shutil.which(tool) is None:
            print(f"soak.py needs {tool}", file=sys.stderr)
            return 2

    main_pid = os.getpid()

    def interrupted(signum, _frame):
        if os.getpid() != main_pid:
            # a forked helper (pyroute2's NetNS worker) must not run our cleanup
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)

    soak = Soak(args)
    code = 1
    try:
        log(f"building the mesh in namespaces {soak.prefix}-*; work dir {soak.workdir}")
        soak.build()
        soak.run_faults()
        extra = soak.finish()
        result = soak.summary(extra)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str))
        code = 0 if not soak.failures else 1
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); cleaning up")
        code = 130
    except Exception as e:  # noqa: BLE001 - report, clean up, exit 1
        import traceback
        traceback.print_exc()
        log(f"soak aborted: {e}")
        code = 1
    finally:
        soak.close()
        if code == 0 and not args.keep:
            shutil.rmtree(soak.workdir, ignore_errors=True)
        else:
            log(f"logs and configs kept in {soak.workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
