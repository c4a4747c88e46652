"""Quick side-by-side: one TCP stream over the raw link and through alpaca-tunnel.

Two namespaces on a bridge (alpaca.testbed), a server 1.1 and a client 16.1,
iperf3 for SECONDS each way, daemon CPU seconds from /proc. Not a test.

usage: python bench/quick.py [SECONDS]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from alpaca.protocol.crypto import genkey
from alpaca.testbed import Testbed, wait_for, write_peer_config

SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 10


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iperf(tb: Testbed, client: str, server_ip: str, seconds: int, reverse: bool = False) -> float:
    srv = tb.popen("s", ["iperf3", "-s", "-1", "-B", server_ip], stdout=open(os.devnull, "w"))
    time.sleep(0.5)
    argv = ["iperf3", "-c", server_ip, "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
    r = tb.run(client, argv, timeout=seconds + 30)
    srv.wait(10)
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="alpaca-bench-"))
    with Testbed(f"ab{os.getpid() % 100000}", subnet=79) as tb:
        s_ip, c_ip = tb.add_host("s", 1), tb.add_host("c", 16)
        keys = {"1.1": genkey(), "16.1": genkey()}
        lines = [f"1.1 {keys['1.1']} {s_ip} null 1040", f"16.1 {keys['16.1']} null null null"]
        procs = {}
        for name, cfg in (("s", {"id": "1.1", "mode": "server"}),
                          ("c", {"id": "16.1", "mode": "client", "gateway": "1.1"})):
            path = write_peer_config(work / name, {**cfg, "group": "bench",
                                                   "control_socket": str(work / f"{name}.sock")}, lines)
            procs[name] = tb.popen(name, [sys.executable, "-m", "alpaca", "-C", str(path)],
                                   stderr=open(work / f"{name}.log", "w"))
        wait_for(lambda: tb.run("c", ["ping", "-c1", "-W1", "10.17.1.1"]).returncode == 0, 10)
        raw = iperf(tb, "c", s_ip, SECONDS)
        before = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        t0 = time.monotonic()
        tun = iperf(tb, "c", "10.17.1.1", SECONDS)
        elapsed = time.monotonic() - t0
        cpu = {n: cpu_seconds(p.pid) - before[n] for n, p in procs.items()}
        gbytes = tun * elapsed / 8 / 1000
        print(f"raw link  : {raw:9.0f} Mbit/s")
        print(f"alpaca    : {tun:9.0f} Mbit/s  ({tun / raw:.3f} of raw)")
        print(f"daemon CPU: {sum(cpu.values()):.1f} s ({cpu}) = {sum(cpu.values()) / gbytes:.1f} CPU s/GB")
        for p in procs.values():
            tb.stop(p)


if __name__ == "__main__":
    main()
