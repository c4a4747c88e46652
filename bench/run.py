"""Side-by-side benchmark: raw veth, wireguard-go and alpaca-tunnel in one run.

    .venv/bin/python bench/run.py [--seconds 10] [--quick] [--loss 0,0.01,0.05]
                                  [--tunnels raw,wireguard-go,alpaca] [--out FILE]

Two network namespaces (<prefix>-a, <prefix>-b) joined by one veth pair, no
bridge, nothing in the root namespace:

    <prefix>-a  eth0 172.30.1.1/24  <---- veth ---->  eth0 172.30.1.2/24  <prefix>-b
    wireguard-go  wg 172.30.2.1/24                     wg 172.30.2.2/24
    alpaca        server 1.1 = 10.17.1.1/16            client 16.1 = 10.17.16.1/16 (gateway 1.1)

The tunnels are measured one after the other (each on a freshly built pair,
torn down before the next, so they never share the CPU). For each tunnel:
iperf3 server in -a on the tunnel address, client in -b (b2a = -b sends;
a2b = iperf3 -R), 1 and 4 streams, the kernel's default congestion control
and CUBIC (-C cubic); ping -b -> -a (50 x 0.01 s) idle and during the
single-stream b2a run; CPU seconds (utime+stime from /proc/<pid>/stat) of the
tunnel daemons at both ends and of the whole machine per GB received.

Then the same tunnel is measured with per-datagram loss: veth offloads off
on both ends (GSO/TSO/GRO/UDP GSO/GSO and GRO lists, so one iptables verdict
is one datagram) for every loss level including 0, and an iptables-legacy
`statistic --mode random` DROP on UDP (raw veth: on every packet, TCP itself
is on the lossy link) arriving in each namespace. The drop ratio actually
achieved is read back from the rule counters.

Writes a JSON file with every number, prints a compact table, and ends with
the line `alpaca/wireguard-go throughput ratio: X.XX` (single stream, clean
link, offloads on, b2a). Needs root, iperf3, ping, ethtool, iptables-legacy;
wireguard-go and wg are optional (their column is skipped). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
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

from alpaca.testbed import Testbed, wait_for, write_peer_config

UNDER_A, UNDER_B = "172.30.1.1", "172.30.1.2"
WG_A, WG_B = "172.30.2.1", "172.30.2.2"
ALPACA_NET = "10.17"
ALPACA_A, ALPACA_B = "10.17.1.1", "10.17.16.1"
ALPACA_PORT = 1040
WG_PORT = 51820
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
TUNNELS = ["raw", "wireguard-go", "alpaca"]


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
    """Two namespaces <prefix>-a and <prefix>-b joined by one veth pair (eth0 on each side);
    unlike Testbed, no hub namespace and no bridge. Testbed's popen/run/stop/close are reused."""

    def __init__(self, prefix: str):   # deliberately not calling Testbed.__init__ (it builds a hub)
        self.prefix, self.subnet, self.hub = prefix, None, None
        self.hosts, self.namespaces, self.procs, self._ifcount = {}, [], [], 0
        try:
            self.add_link("a", "b", UNDER_A, UNDER_B, 24)
            self.hosts = {"a": UNDER_A, "b": UNDER_B}
            if not wait_for(lambda: self.run("b", ["ping", "-c1", "-W1", "-q", UNDER_A]).returncode == 0, 5):
                raise RuntimeError("underlay ping b -> a failed")
        except BaseException:
            self.close()
            raise

    def sh(self, side: str, argv: list[str], check: bool = True, timeout: float = 30) -> str:
        r = self.run(side, argv, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.ns(side)}: {r.stderr.strip() or r.returncode}")
        return r.stdout

    def offloads(self, on: bool) -> dict:
        for side in ("a", "b"):
            # one feature per call: ethtool refuses the whole call if one is unknown
            for f in OFFLOAD_TX + ([] if on else OFFLOAD_RX):
                self.sh(side, ["ethtool", "-K", "eth0", f, "on" if on else "off"], check=False)
        state = self.offload_state()
        if not on:
            left = {s: [k for k, v in feats.items() if v == "on"] for s, feats in state.items()}
            if any(left.values()):
                raise RuntimeError(f"veth offloads still on: {left}")
        return state

    def offload_state(self) -> dict:
        state = {}
        for side in ("a", "b"):
            feats = {}
            for line in self.sh(side, ["ethtool", "-k", "eth0"]).splitlines():
                name, _, value = line.strip().partition(":")
                if name in OFFLOAD_SHOW:
                    feats[name] = value.split()[0] if value.split() else ""
            state[side] = feats
        return state

    # ------------------------------------------------------------ loss emulation
    def set_loss(self, p: float, udp_only: bool) -> None:
        """Counting rules (+ a DROP when p > 0) on packets arriving on eth0 in both namespaces."""
        self.clear_loss()
        m = ["-p", "udp"] if udp_only else []
        self._rules = []
        for side in ("a", "b"):
            specs = [["-i", "eth0", *m, "-m", "comment", "--comment", CNT],
                     ["-i", "eth0", *m, "-m", "length", "--length", "1501:65535", "-m", "comment", "--comment", BIG]]
            if p > 0:
                specs.append(["-i", "eth0", *m, "-m", "statistic", "--mode", "random", "--probability", f"{p:.6f}",
                              "-m", "comment", "--comment", DROP, "-j", "DROP"])
            for spec in specs:
                self.sh(side, [IPT, "-w", "-A", "INPUT", *spec])
                self._rules.append((side, spec))

    def clear_loss(self) -> None:
        for side, spec in getattr(self, "_rules", []):
            self.sh(side, [IPT, "-w", "-D", "INPUT", *spec], check=False)
        self._rules = []

    def counters(self) -> dict:
        """{"a": {"seen", "oversize", "dropped"}, "b": {...}} packets counted by our rules."""
        out = {}
        for side in ("a", "b"):
            c = {"seen": 0, "oversize": 0, "dropped": 0}
            for line in self.sh(side, [IPT, "-w", "-L", "INPUT", "-v", "-n", "-x"]).splitlines():
                for key, comment in (("seen", CNT), ("oversize", BIG), ("dropped", DROP)):
                    if f"/* {comment} */" in line:
                        c[key] = int(line.split()[0])
            out[side] = c
        return out


def counter_delta(before: dict, after: dict) -> dict:
    d = {s: {k: after[s][k] - before[s][k] for k in after[s]} for s in after}
    seen = sum(v["seen"] for v in d.values())
    dropped = sum(v["dropped"] for v in d.values())
    d["total"] = {"seen": seen, "dropped": dropped, "oversize": sum(v["oversize"] for v in d.values() if "seen" in v),
                  "drop_ratio": dropped / seen if seen else None}
    return d


# ---------------------------------------------------------------- tunnels

class Tunnel:
    name = "?"
    dst = UNDER_A              # address of -a the traffic goes to
    udp_only = True            # loss rule matches tunnel datagrams only

    def available(self) -> str | None:
        return None

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
        under = {"a": UNDER_A, "b": UNDER_B}
        for side, other in (("a", "b"), ("b", "a")):
            dev = self.ifname[side]
            pair.sh(side, ["wg", "set", dev, "listen-port", str(WG_PORT), "private-key", str(keys[side]),
                           "peer", pubs[other], "allowed-ips", f"{addr[other]}/32",
                           "endpoint", f"{under[other]}:{WG_PORT}"])
            pair.sh(side, ["ip", "addr", "add", f"{addr[side]}/24", "dev", dev])
            pair.sh(side, ["ip", "link", "set", dev, "mtu", "1420", "up"])

    def stop(self, pair: Pair) -> None:
        super().stop(pair)
        for side in ("a", "b"):
            self._sock(side).unlink(missing_ok=True)

    def _sock(self, side: str) -> Path:
        return Path("/var/run/wireguard") / f"{self.ifname[side]}.sock"

    def log_tail(self) -> str:
        return " | ".join((self.work / f"wg-{s}.log").read_text(errors="replace")[-300:]
                          for s in ("a", "b") if (self.work / f"wg-{s}.log").exists())


class Alpaca(Tunnel):
    name = "alpaca"
    dst = ALPACA_A

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
        lines = [f"1.1 {keys['1.1']} {UNDER_A} null {ALPACA_PORT}", f"16.1 {keys['16.1']} null null null"]
        cfgs = {"a": {"id": "1.1", "mode": "server"},
                "b": {"id": "16.1", "mode": "client", "gateway": "1.1"}}
        for side, cfg in cfgs.items():
            path = write_peer_config(work / f"alpaca-{side}", {
                **cfg, "group": "bench", "net": ALPACA_NET, "port": ALPACA_PORT, "log_level": "warning",
                "control_socket": str(work / f"alpaca-{side}.sock")}, lines)
            with open(work / f"alpaca-{side}.log", "wb") as logf:
                self.daemons[side] = pair.popen(side, [sys.executable, "-m", "alpaca", "-C", str(path)],
                                                stdout=logf, stderr=logf, cwd=str(ROOT))
        for side in ("a", "b"):
            if not wait_for(lambda side=side: (self.work / f"alpaca-{side}.sock").exists()
                            or self.daemons[side].poll() is not None, 20) \
                    or self.daemons[side].poll() is not None:
                raise RuntimeError(f"alpaca in {side} did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        return " | ".join((self.work / f"alpaca-{s}.log").read_text(errors="replace")[-400:]
                          for s in ("a", "b") if (self.work / f"alpaca-{s}.log").exists())


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
    finally:
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            pair.stop(srv, signal.SIGKILL, 5)
    res["wall_s"] = round(t1 - t0, 3)
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
    cond.update({"ping_idle": ping(pair, tunnel.dst), "runs": {}})
    c0 = pair.counters() if lossy else None
    for streams, direction, cc, ping_load in runs:
        key = run_key(streams, direction, cc)
        r = cond["runs"][key] = iperf(pair, tunnel, args, streams, direction, cc, ping_load, lossy)
        txt = f"{r['mbit_s']:9.1f} Mbit/s" if "mbit_s" in r else "   failed"
        if r.get("daemon_cpu_s_per_gb") is not None:
            txt += f", {r['daemon_cpu_s_per_gb']:.1f} daemon CPU s/GB"
        if r.get("loss_counters"):
            tot = r["loss_counters"]["total"]
            txt += f", dropped {100 * (tot['drop_ratio'] or 0):.2f} % of {tot['seen']}"
        log(f"  {tunnel.name:12s} {key:16s} {txt}" + (f"  ERROR {r['error']}" if "error" in r else ""))
    if lossy:
        cond["loss_counters"] = counter_delta(c0, pair.counters())


def bench_tunnel(tunnel: Tunnel, args, prefix: str, work: Path, res: dict) -> None:
    """Fills res as it goes (an interrupted run keeps what was measured)."""
    why = tunnel.available()
    if why:
        log(f"{tunnel.name}: skipped ({why})")
        res.update({"available": False, "reason": why})
        return
    res.update({"available": True, "versions": tunnel.versions(), "conditions": {}})
    pair = Pair(prefix)
    try:
        res["default_cc"] = {s: pair.sh(s, ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]).strip()
                             for s in ("a", "b")}
        t0 = time.monotonic()
        tunnel.start(pair, work)
        if not wait_for(lambda: pair.run("b", ["ping", "-c1", "-W1", "-q", tunnel.dst]).returncode == 0, 30, 0.2):
            raise RuntimeError(f"no ping through {tunnel.name} within 30 s: {tunnel.log_tail()}")
        res["setup_s"] = round(time.monotonic() - t0, 2)
        log(f"{tunnel.name}: up after {res['setup_s']} s")
        clean = res["conditions"]["clean"] = {"offloads": "on", "loss": None, "offload_state": pair.offload_state()}
        measure_condition(pair, tunnel, args, QUICK_RUNS if args.quick else CLEAN_RUNS, False, clean)
        if args.loss:
            state = pair.offloads(False)
            for p in args.loss:
                pair.set_loss(p, tunnel.udp_only)
                log(f"{tunnel.name}: offloads off, loss {100 * p:g} % ({'UDP' if tunnel.udp_only else 'all'})")
                cond = res["conditions"][f"loss-{p:g}"] = {
                    "offloads": "off", "loss": p, "loss_matches": "udp" if tunnel.udp_only else "all",
                    "offload_state": state}
                measure_condition(pair, tunnel, args, QUICK_RUNS if args.quick else LOSS_RUNS, True, cond)
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


# ---------------------------------------------------------------- report

def get(res: dict, tunnel: str, cond: str, *path):
    v = res["tunnels"].get(tunnel, {}).get("conditions", {}).get(cond)
    for p in path:
        if not isinstance(v, dict):
            return None
        v = v.get(p)
    return v


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(res: dict) -> str:
    tunnels = [t for t in TUNNELS if res["tunnels"].get(t, {}).get("available")]
    rows: list[tuple[str, list]] = []

    def add(label, values, spec, ratio=True, busy=None):
        cells = [fmt(v, spec) + ("*" if busy and busy[i] else " ") for i, v in enumerate(values)]
        a = dict(zip(tunnels, values))
        r = "-"
        if ratio and a.get("alpaca") is not None and a.get("wireguard-go"):
            r = f"{a['alpaca'] / a['wireguard-go']:.2f}"
        rows.append((label, cells + [r]))

    conds = [c for c in ["clean"] + [f"loss-{p:g}" for p in res["args"]["loss"]]]
    for cond in conds:
        first = next((res["tunnels"][t]["conditions"].get(cond) for t in tunnels
                      if res["tunnels"][t].get("conditions", {}).get(cond)), None)
        if first is None:
            continue
        if cond == "clean":
            rows.append(("clean link, offloads on", None))
        else:
            rows.append((f"offloads off, {100 * first['loss']:g} % loss each way", None))
        def busy(key, cond=cond):
            return [(get(res, t, cond, "runs", key, "busy_pct_before") or 0) > res["args"]["quiet_pct"]
                    for t in tunnels]
        run_keys = list(first["runs"])
        for key in run_keys:
            add(f"  {key} Mbit/s", [get(res, t, cond, "runs", key, "mbit_s") for t in tunnels], ".0f",
                busy=busy(key))
        key1 = run_key(1, "b2a", "default")
        add("  ping idle avg ms", [get(res, t, cond, "ping_idle", "avg_ms") for t in tunnels], ".3f")
        add(f"  ping load avg ms ({key1})", [get(res, t, cond, "runs", key1, "ping_load", "avg_ms")
                                              for t in tunnels], ".2f")
        add(f"  daemon CPU s/GB ({key1})", [get(res, t, cond, "runs", key1, "daemon_cpu_s_per_gb")
                                             for t in tunnels], ".1f", busy=busy(key1))
        add(f"  machine CPU s/GB ({key1})", [get(res, t, cond, "runs", key1, "machine_cpu_s_per_gb")
                                              for t in tunnels], ".1f", busy=busy(key1))
        if cond != "clean":
            add("  ping idle lost %", [get(res, t, cond, "ping_idle", "loss_pct") for t in tunnels], ".0f",
                ratio=False)
            add("  measured drop %", [None if (x := get(res, t, cond, "loss_counters", "total", "drop_ratio")) is None
                                      else 100 * x for t in tunnels], ".2f", ratio=False)
    head = ["", *tunnels, "alpaca/wg"]
    w0 = max(len(r[0]) for r in rows + [("", None)])
    widths = [max(len(head[i + 1]) + 1, 10) for i in range(len(head) - 1)]
    lines = [f"{'':{w0}}  " + "  ".join(f"{h + ' ':>{w}}" for h, w in zip(head[1:], widths))]
    for label, cells in rows:
        if cells is None:
            lines.append(label)
        else:
            lines.append(f"{label:{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def ratio(res: dict, field: str) -> float | None:
    key = run_key(1, "b2a", "default")
    a = get(res, "alpaca", "clean", "runs", key, field)
    w = get(res, "wireguard-go", "clean", "runs", key, field)
    return a / w if a is not None and w else None


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=None, help="seconds per iperf3 run (default 10; 3 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="one short single-stream run per tunnel (clean link only unless --loss is given)")
    ap.add_argument("--loss", default=None,
                    help="comma-separated drop probabilities (default 0,0.01,0.05; none with --quick; '' = no loss runs)")
    ap.add_argument("--tunnels", default=",".join(TUNNELS), help=f"subset of {','.join(TUNNELS)}")
    ap.add_argument("--out", default=None, help="JSON result (default bench/results/<timestamp>.json)")
    ap.add_argument("--quiet-pct", type=float, default=20.0,
                    help="before each run wait until the machine is under this busy %% ...")
    ap.add_argument("--quiet-max", type=float, default=10.0, help="... for at most this many seconds")
    ap.add_argument("--quiet-budget", type=float, default=60.0,
                    help="total seconds of such waiting over the whole run (default 60)")
    args = ap.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3 if args.quick else 10
    if args.loss is None:
        args.loss = "" if args.quick else "0,0.01,0.05"
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
    for tool in ("iperf3", "ping", "ip", "ss", "ethtool", "sysctl") + ((IPT,) if args.loss else ()):
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
        "args": {"seconds": args.seconds, "quick": args.quick, "loss": args.loss, "tunnels": args.tunnels,
                 "quiet_pct": args.quiet_pct, "quiet_max": args.quiet_max, "quiet_budget": args.quiet_budget},
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "machine": platform.machine(),
                 "iperf3": subprocess.run(["iperf3", "--version"], capture_output=True,
                                          text=True, check=False).stdout.split("\n")[0].strip()},
        "topology": {"underlay": f"{UNDER_A}/24 <-veth-> {UNDER_B}/24", "wireguard-go": f"{WG_A} <-> {WG_B}, mtu 1420",
                     "alpaca": f"server 1.1 {ALPACA_A} (ns a) <-> client 16.1 {ALPACA_B} (ns b), default mtu"},
        "tunnels": {},
    }
    prefix = f"ab{os.getpid() % 100000}"
    work = Path(tempfile.mkdtemp(prefix="alpaca-bench-"))
    classes = {"raw": Raw, "wireguard-go": WireguardGo, "alpaca": Alpaca}
    t_start = time.monotonic()
    interrupted = False
    try:
        for i, name in enumerate(args.tunnels):
            log(f"== {name}")
            bench_tunnel(classes[name](), args, f"{prefix}{i}", work, res["tunnels"].setdefault(name, {}))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaned up; partial results follow")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    res["ratios"] = {"alpaca/wireguard-go throughput": ratio(res, "mbit_s"),
                     "alpaca/wireguard-go daemon CPU s/GB": ratio(res, "daemon_cpu_s_per_gb"),
                     "basis": f"{run_key(1, 'b2a', 'default')}, clean link, offloads on"}
    print(table(res))
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
        if t.get("available") is False:
            print(f"{name}: skipped ({t['reason']})")
        if t.get("error"):
            print(f"{name}: ERROR {t['error']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    cpu = res["ratios"]["alpaca/wireguard-go daemon CPU s/GB"]
    print(f"alpaca/wireguard-go daemon CPU s/GB ratio: {fmt(cpu, '.2f') if cpu is not None else 'n/a'}")
    r = res["ratios"]["alpaca/wireguard-go throughput"]
    print(f"alpaca/wireguard-go throughput ratio: {format(r, '.2f') if r is not None else 'n/a'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
