"""UDP mode (run.py --udp RATES): iperf3 -u at fixed offered rates through each tunnel.

Per datagram length (--udp-len, default 1200: QUIC-like) and offered rate,
one `iperf3 -u -l LEN -b RATE` run from -b to -a on the clean link; iperf3's
own count of lost datagrams (by sequence number, at the receiver) gives the
loss. A tunnel's figure per length is the highest delivered rate of a run
that lost under UDP_MAX_LOSS %. iperf3 3.12 writes one datagram per send
(no UDP_SEGMENT), so this measures a tunnel's per-packet cost.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

from common import IPERF_PORT, log
from alpaca.lab.testbed import wait_for
from benchproc import cpu_seconds, descendants, machine_ticks, wait_quiet
from topology import Pair
from tunnels import Tunnel

UDP_MAX_LOSS = 1.0      # % lost that still counts as delivered


def iperf_udp_run(pair: Pair, tunnel: Tunnel, args, rate: float, length: int) -> dict:
    res: dict = {"offered_mbit_s": rate, "len": length, "seconds": args.seconds}
    res["busy_pct_before"] = round(wait_quiet(args), 1)
    srv = pair.popen("a", ["iperf3", "-s", "-1", "-B", tunnel.dst, "-p", str(IPERF_PORT)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for(lambda: pair.run("a", ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]).stdout.strip(), 5, 0.05):
            res["error"] = "iperf3 server did not listen"
            return res
        pids = {side: descendants(p.pid) for side, p in tunnel.daemons.items()}
        cpu0 = {side: cpu_seconds(p) for side, p in pids.items()}
        m0 = machine_ticks()
        r = pair.run("b", ["iperf3", "-c", tunnel.dst, "-p", str(IPERF_PORT), "-u", "-b", f"{rate}M",
                           "-l", str(length), "-w", "4M", "-t", str(args.seconds), "-J"], timeout=args.seconds + 30)
        m1 = machine_ticks()
        cpu1 = {side: cpu_seconds(p) for side, p in pids.items()}
    finally:
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            pair.stop(srv, signal.SIGKILL, 5)
    res["daemon_cpu_s"] = {side: round(cpu1[side] - cpu0[side], 2) for side in cpu0}
    res["machine_busy_pct"] = 100 * (m1["busy"] - m0["busy"]) / max(1, sum(m1.values()) - sum(m0.values()))
    return udp_result(r, res)


def udp_result(r: subprocess.CompletedProcess, res: dict) -> dict:
    """res with what an `iperf3 -u -J` client run reported: sent and delivered
    Mbit/s, datagrams, and how many of them the server did not get."""
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


def udp_sweep(pair: Pair, tunnel: Tunnel, args) -> dict:
    """Every (length, rate) of the UDP mode; per length the best delivered rate under UDP_MAX_LOSS %."""
    out: dict = {"method": f"iperf3 -u -l LEN -b RATE -w 4M -t {args.seconds}, ns-b -> ns-a, clean link; "
                           f"best = highest delivered Mbit/s of a run losing < {UDP_MAX_LOSS:g} %",
                 "runs": [], "best": {}}
    for length in args.udp_len:
        for rate in args.udp:
            r = iperf_udp_run(pair, tunnel, args, rate, length)
            out["runs"].append(r)
            if "error" in r:
                log(f"  {tunnel.name:12s} UDP {length} B at {rate:g} Mbit/s: ERROR {r['error']}")
                continue
            log(f"  {tunnel.name:12s} UDP {length} B at {rate:6g} Mbit/s: sent {r['sender_mbit_s']:6.0f}, "
                f"delivered {r['mbit_s']:6.0f} Mbit/s, lost {r['lost_pct']:.2f} %, daemon CPU s "
                f"{r['daemon_cpu_s']}")
            if r["lost_pct"] < UDP_MAX_LOSS and r["mbit_s"] > out["best"].get(str(length), 0):
                out["best"][str(length)] = r["mbit_s"]
            time.sleep(0.5)
    return out


def udp_report(res: dict) -> list[str]:
    """Lines: per length, each tunnel's best delivered rate and alpaca's ratio to wireguard-go."""
    lines = []
    best = {name: t.get("udp", {}).get("best", {}) for name, t in res["tunnels"].items() if t.get("udp")}
    lengths = sorted({length for b in best.values() for length in b}, key=int)
    for length in lengths:
        cells = ", ".join(f"{name} {b.get(length, 0):.0f}" for name, b in best.items())
        a, w = best.get("alpaca", {}).get(length), best.get("wireguard-go", {}).get(length)
        ratio = f"{a / w:.2f}" if a and w else "n/a (a tunnel lost >= 1 % at every rate: add lower rates)"
        lines.append(f"UDP {length} B, best delivered Mbit/s at < {UDP_MAX_LOSS:g} % loss: {cells}; "
                     f"alpaca/wireguard-go UDP ratio: {ratio}")
    return lines
