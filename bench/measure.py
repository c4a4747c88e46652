"""Measurements: iperf3 runs, pings, the relay's capacity."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

from common import (CAPACITY_LEN, CAPACITY_MAX_LOSS, CAPACITY_RATES, CLEAN_RUNS, HZ, IPERF_PORT, LOSS_RUNS,
                    QUICK_RUNS, RELAY_B, UNDER_A, WAN_RUNS, log, run_key)
from alpaca.lab.testbed import wait_for
from benchproc import cpu_seconds, descendants, machine_ticks, wait_quiet
from topology import Pair, WanPair, counter_delta
from tunnels import Alpaca, Tunnel, WireguardGo
from udp import udp_result, udp_sweep


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


@contextlib.contextmanager
def iperf_server(pair: Pair, address: str):
    """A one-shot iperf3 server in -a on `address`; yields whether it listens, and is reaped after."""
    srv = pair.popen("a", ["iperf3", "-s", "-1", "-B", address, "-p", str(IPERF_PORT)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield bool(wait_for(lambda: pair.run("a", ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]).stdout.strip(), 5, 0.05))
    finally:
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            pair.stop(srv, signal.SIGKILL, 5)


def iperf(pair: Pair, tunnel: Tunnel, args, streams: int, direction: str, cc: str, ping_load: bool,
          lossy: bool) -> dict:
    res: dict = {"streams": streams, "direction": direction, "cc": cc, "seconds": args.seconds}
    res["busy_pct_before"] = round(wait_quiet(args), 1)
    with iperf_server(pair, tunnel.dst) as listening:
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
    pair = Pair(prefix, paths, tunnel.ipt) if args.wan is None else WanPair(prefix, args, work, paths)
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
        if args.udp:
            res["udp"] = udp_sweep(pair, tunnel, args)
            tunnel.check_alive()
        elif args.wan is None:
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
    with iperf_server(pair, UNDER_A) as listening:
        if not listening:
            res["error"] = "iperf3 server did not listen"
            return res
        c0, m0 = pair.counters(), machine_ticks()
        r = pair.run("b", ["iperf3", "-c", RELAY_B, "-p", str(IPERF_PORT), "-u", "-b", f"{rate}M",
                           "-l", str(CAPACITY_LEN), "-w", "4M", "-t", str(seconds), "-J"], timeout=seconds + 30)
        m1 = machine_ticks()
        res["relay"] = counter_delta(c0, pair.counters())
        res["machine_busy_pct"] = 100 * (m1["busy"] - m0["busy"]) / max(1, sum(m1.values()) - sum(m0.values()))
    return udp_result(r, res)


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
