"""Side-by-side benchmark: raw veth, wireguard-go, OpenVPN and alpaca-tunnel in one run.

    .venv/bin/python bench/run.py [--seconds 10] [--quick] [--loss 0,0.01,0.05,0.3]
                                  [--tunnels raw,wireguard-go,openvpn,alpaca,alpaca-ipv6,wg-udpspeeder]
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

IPv6 underlay (the tunnel "alpaca-ipv6"): link 1 also has fd30:1::1/64 and
fd30:1::2/64 (no DAD); alpaca-ipv6 is alpaca with the same settings whose
client knows the server only by its ip6 column, so the whole tunnel runs on
the IPv6 sockets (UDP GSO/GRO as on IPv4), and its loss rules are
ip6tables-legacy ones. Run it beside "alpaca" (`--tunnels alpaca,alpaca-ipv6`)
and the report ends with `alpaca IPv6/IPv4 underlay throughput ratio`
(single stream b2a, clean link; the goal is >= 0.90). Not in WAN mode (the
relay is IPv4) and no --paths 2 entry.

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

The code: run.py (arguments, the order of runs, the JSON), common.py
(addresses, ports, the runs to make), topology.py (the namespaces, links and
relays), tunnels.py (each tunnel's start and stop), measure.py (iperf3,
ping, relay capacity), report.py (the table and ratios), benchproc.py (/proc
readings), wan_relay.py (the WAN relay).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from common import (ALPACA_A, ALPACA_B, CAPACITY_LEN, CAPACITY_MAX_LOSS, DUAL, IPT, LOSS, OVPN_A, OVPN_B,
                    OVPN_PORT, RELAY2_A, RELAY2_B, RELAY_A, RELAY_B, ROOT, SPEEDER_FEC, SPEEDER_WG_MTU, TUNNELS,
                    UNDER2_A, UNDER2_B, UNDER_A, UNDER_B, WAN2_B, WAN_B, WG_A, WG_B, log, run_key)
from measure import bench_tunnel, relay_capacity
from report import dual_ratios, fmt, ipv6_ratio, ratio, table
from tunnels import CLASSES
from udp import udp_report


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
    ap.add_argument("--udp", default=None, metavar="RATES",
                    help="UDP mode: comma-separated offered Mbit/s; per tunnel, iperf3 -u at each rate and each "
                         "--udp-len on the clean link, instead of the TCP runs (bench/udp.py)")
    ap.add_argument("--udp-len", default="1200", help="UDP mode: comma-separated datagram lengths (1200)")
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
    args.udp = [float(x) for x in args.udp.split(",") if x.strip()] if args.udp else None
    args.udp_len = [int(x) for x in args.udp_len.split(",") if x.strip()]
    if args.udp:
        args.loss = []
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
                 "capacity_seconds": args.capacity_seconds, "paths": args.paths,
                 "udp": args.udp, "udp_len": args.udp_len},
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
    if (v6 := ipv6_ratio(res)) is not None:
        res["ratios"]["alpaca IPv6/IPv4 underlay throughput"] = v6
    print(table(res))
    for line in udp_report(res):
        print(line)
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
    if v6 is not None:
        print(f"alpaca IPv6/IPv4 underlay throughput ratio ({run_key(1, 'b2a', 'default')}, clean): "
              f"{v6:.2f} (goal: >= 0.90)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    cpu = res["ratios"]["alpaca/wireguard-go daemon CPU s/GB"]
    print(f"alpaca/wireguard-go daemon CPU s/GB ratio: {fmt(cpu, '.2f') if cpu is not None else 'n/a'}")
    r = res["ratios"]["alpaca/wireguard-go throughput"]
    print(f"alpaca/wireguard-go throughput ratio: {format(r, '.2f') if r is not None else 'n/a'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
