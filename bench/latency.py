"""Ping under load, side by side: wireguard-go and one or more alpaca checkouts, alternated.

    .venv/bin/python bench/latency.py [--rounds 5] [--seconds 8] [--offloads on|off]
                                      [--variants wireguard-go,alpaca,before=/tmp/alpaca-main]
                                      [--probe] [--keep-logs DIR] [--out FILE]

The same two namespaces as bench/run.py (one veth pair). Each round starts
every variant in turn (the order rotates from round to round), so a busy
spell of the shared machine hits them all alike: a second of idle pings,
then one TCP stream b -> a (iperf3, the kernel's default congestion
control) for --seconds, and from its second second on a ping b -> a every
20 ms, each RTT kept. A variant "NAME=DIR" runs the daemon from another
checkout (e.g. `git archive main | tar -x -C /tmp/alpaca-main`), "alpaca"
this one.

Per variant: the median over rounds of each round's median and 90th
percentile RTT under load, the idle median, throughput, the tunnel
daemons' CPU seconds per GB, and the sending TUN device's tx drops (its
queue overflowing). --probe also samples, every 100 ms during the load,
where bytes wait: the receiving daemon's UDP socket (Recv-Q), the sending
daemon's UDP socket (Send-Q) and the TCP sender (unacked, cwnd). The
sampling itself costs CPU: compare probed runs with probed runs.
Not a test; needs root, iperf3, ping, ss; wireguard-go and wg for its column.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ALPACA_PORT, IPERF_PORT, ROOT, WG_PORT, log
from benchproc import cpu_seconds, descendants
from measure import iperf_server
from topology import Pair
from tunnels import Alpaca, WireguardGo

from alpaca.lab.testbed import wait_for

RTT_RE = re.compile(r"time=([\d.]+) ms")
PING_INTERVAL = 0.02


class AlpacaAt(Alpaca):
    """alpaca run from the checkout `src` (its own code, this checkout's bench)."""

    def __init__(self, label: str, src: Path):
        self.name, self.src = label, src

    def start(self, pair: Pair, work: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.src)}
        real_popen = pair.popen
        pair.popen = lambda side, argv, **kw: real_popen(side, argv, **{**kw, "cwd": str(self.src), "env": env})
        try:
            super().start(pair, work)
        finally:
            pair.popen = real_popen


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def pings(pair: Pair, dst: str, seconds: float) -> list[float]:
    count = max(1, int(seconds / PING_INTERVAL))
    r = pair.run("b", ["ping", "-n", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "1", dst],
                 timeout=seconds + 30)
    return [float(x) for x in RTT_RE.findall(r.stdout)]


def ss_numbers(pair: Pair, side: str, argv: list[str]) -> str:
    return pair.run(side, ["ss", "-H", *argv], timeout=5).stdout


class Probe(threading.Thread):
    """Samples the queues every 100 ms while the load runs."""

    def __init__(self, pair: Pair, port: int):
        super().__init__(daemon=True)
        self.pair, self.port, self.done = pair, port, threading.Event()
        self.samples: dict[str, list[int]] = {"rx_recvq": [], "tx_sendq": [], "tcp_unacked": [], "tcp_cwnd": []}

    def run(self) -> None:
        while not self.done.wait(0.1):
            for side, key, col in (("a", "rx_recvq", 0), ("b", "tx_sendq", 1)):
                lines = ss_numbers(self.pair, side, ["-uan", f"sport = :{self.port}"]).splitlines()
                # (one line per socket: the IPv4 one and the idle IPv6 one)
                self.samples[key].append(sum(int(line.split()[1 + col]) for line in lines))
            out = ss_numbers(self.pair, "b", ["-tin", f"dport = :{IPERF_PORT}"])
            for key, pat in (("tcp_unacked", r"unacked:(\d+)"), ("tcp_cwnd", r"cwnd:(\d+)")):
                vals = [int(v) for v in re.findall(pat, out)]
                if vals:
                    self.samples[key].append(max(vals))


def tun_stats(pair: Pair, tunnel) -> dict:
    return pair.link_stats("b", tunnel.ifname["b"] if isinstance(tunnel, WireguardGo) else "alpaca")


def load_run(pair: Pair, tunnel, args) -> dict:
    """One iperf3 stream b -> a with pings from its second second on."""
    res: dict = {}
    with iperf_server(pair, tunnel.dst) as listening:
        if not listening:
            return {"error": "iperf3 server did not listen"}
        pids = [p for d in tunnel.daemons.values() for p in descendants(d.pid)]
        cpu0, st0 = cpu_seconds(pids), tun_stats(pair, tunnel)
        cli = pair.popen("b", ["iperf3", "-c", tunnel.dst, "-p", str(IPERF_PORT), "-t", str(args.seconds), "-J"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        probe = Probe(pair, ALPACA_PORT if isinstance(tunnel, Alpaca) else WG_PORT) if args.probe else None
        time.sleep(1.0)
        if probe:
            probe.start()
        rtts = pings(pair, tunnel.dst, args.seconds - 2)
        if probe:
            probe.done.set()
            probe.join()
        out, _err = cli.communicate(timeout=args.seconds + 30)
        cpu1, st1 = cpu_seconds(pids), tun_stats(pair, tunnel)
    try:
        gb = json.loads(out)["end"]["sum_received"]["bytes"] / 1e9
        res["mbit_s"] = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        return {"error": "iperf3 gave no result"}
    res.update({"rtt_median_ms": statistics.median(rtts) if rtts else None, "rtt_p90_ms": percentile(rtts, 0.9),
                "pings": len(rtts), "cpu_s_per_gb": (cpu1 - cpu0) / gb if gb else None,
                "tun_tx_dropped": st1.get("tx_dropped", 0) - st0.get("tx_dropped", 0)})
    if probe:
        res["probe"] = {k: {"median": percentile(v, 0.5), "max": max(v, default=None)}
                        for k, v in probe.samples.items()}
    return res


def one_round(pair: Pair, tunnel, args, work: Path, tag: str) -> dict:
    tunnel.start(pair, work)
    try:
        if not wait_for(lambda: pair.run("b", ["ping", "-c1", "-W1", "-q", tunnel.dst]).returncode == 0, 30, 0.2):
            return {"error": f"no ping through {tunnel.name}"}
        time.sleep(1.0)
        idle = pings(pair, tunnel.dst, 1.0)
        res = load_run(pair, tunnel, args)
        res["idle_median_ms"] = statistics.median(idle) if idle else None
        return res
    finally:
        tunnel.stop(pair)
        if args.keep_logs and isinstance(tunnel, Alpaca):
            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for side in ("a", "b"):
                shutil.copy(work / f"alpaca-{side}.log", Path(args.keep_logs) / f"{tag}-{side}.log")


def make_variants(spec: str) -> list:
    out = []
    for item in spec.split(","):
        label, _, src = item.strip().partition("=")
        if label == "wireguard-go":
            out.append(WireguardGo())
        else:
            out.append(AlpacaAt(label, Path(src).resolve() if src else ROOT))
    return out


def summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]

    def med(key):
        vals = [r[key] for r in ok if r.get(key) is not None]
        return round(statistics.median(vals), 3) if vals else None
    out = {k: med(k) for k in ("rtt_median_ms", "rtt_p90_ms", "idle_median_ms", "mbit_s", "cpu_s_per_gb",
                               "tun_tx_dropped")}
    out["runs"], out["errors"] = len(ok), len(runs) - len(ok)
    probes = [r["probe"] for r in ok if "probe" in r]
    if probes:
        out["probe_median"] = {k: statistics.median(p[k]["median"] for p in probes if p[k]["median"] is not None)
                               for k in probes[0] if any(p[k]["median"] is not None for p in probes)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--offloads", choices=("on", "off"), default="on",
                    help="veth offloads (off: every datagram on its own, no UDP GRO; as bench/run.py's lossy runs)")
    ap.add_argument("--variants", default="wireguard-go,alpaca")
    ap.add_argument("--probe", action="store_true", help="sample the queues during the load (costs CPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep-logs", default=None, metavar="DIR", help="copy each alpaca run's daemon logs here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/latency.py needs root (network namespaces)")
    variants = make_variants(args.variants)
    variants = [v for v in variants if not v.available()]
    work = Path(tempfile.mkdtemp(prefix="alpaca-latency-"))
    pair = Pair(f"al{os.getpid() % 100000}")
    results: dict[str, list] = {v.name: [] for v in variants}
    try:
        if args.offloads == "off":
            pair.offloads(False)
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for tunnel in order:
                r = one_round(pair, tunnel, args, work, f"{tunnel.name}-{rnd + 1}")
                results[tunnel.name].append(r)
                log(f"round {rnd + 1} {tunnel.name:14s} " + json.dumps(r))
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        pair.close()
        shutil.rmtree(work, ignore_errors=True)
    report = {"args": vars(args), "summary": {name: summary(runs) for name, runs in results.items()},
              "runs": results}
    print(f"{'variant':14s} {'load med ms':>11s} {'load p90':>9s} {'idle ms':>8s} {'Mbit/s':>8s} {'CPU s/GB':>9s}")
    for name, s in report["summary"].items():
        print(f"{name:14s} {s['rtt_median_ms']!s:>11s} {s['rtt_p90_ms']!s:>9s} {s['idle_median_ms']!s:>8s} "
              f"{s['mbit_s']!s:>8s} {s['cpu_s_per_gb']!s:>9s}" + (f"  {s['probe_median']}" if 'probe_median' in s else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
