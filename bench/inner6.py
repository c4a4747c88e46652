"""Inner IPv4 against inner IPv6: one TCP stream through one alpaca tunnel to the
server's IPv4 and IPv6 tunnel addresses, alternating, 3 rounds of 8 s (veth
offloads on, no loss; the pair of alpaca/lab/worlds.py). Prints each run
(Mbit/s, daemon CPU s/GB of both ends) and the ratio of the medians.

    .venv/bin/python bench/inner6.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchproc import cpu_seconds

from alpaca.lab.worlds import lossy_pair

ROUNDS, SECONDS = 3, 8


def one_run(mesh, dst: str) -> tuple[int, float]:
    """(Mbit/s received, daemon CPU s/GB of both ends) of one iperf3 run to dst."""
    pids = [mesh.peers[n].proc.pid for n in ("s1", "c1")]
    before = cpu_seconds(pids)
    r = mesh.tb.run("c1", ["iperf3", "-c", dst, "-t", str(SECONDS), "-J"], timeout=SECONDS + 60)
    got = json.loads(r.stdout)["end"]["sum_received"]
    return round(got["bits_per_second"] / 1e6), round((cpu_seconds(pids) - before) / (got["bytes"] / 1e9), 1)


def main() -> None:
    with tempfile.TemporaryDirectory() as work, lossy_pair(Path(work), 0.0, {}, {}) as mesh:
        for host in ("s1", "c1"):      # lossy_pair turns them off for its loss rule; none here
            mesh.tb.run(host, ["ethtool", "-K", "eth0", "gso", "on", "tso", "on", "gro", "on",
                               "tx-udp-segmentation", "on"])
        address6 = mesh.peers["c1"].peer_status("1.1")["address6"]
        server = mesh.tb.popen("s1", ["iperf3", "-s"], stdout=subprocess.DEVNULL)
        try:
            time.sleep(1)
            mesh.peers["c1"].run(["ping", "-c", "3", "-i", "0.2", "10.17.1.1"])
            mesh.peers["c1"].run(["ping", "-6", "-c", "3", "-i", "0.2", address6])
            runs: dict[str, list] = {"ipv4": [], "ipv6": []}
            for _ in range(ROUNDS):
                for family, dst in (("ipv4", "10.17.1.1"), ("ipv6", address6)):
                    time.sleep(2)
                    runs[family].append(one_run(mesh, dst))
        finally:
            mesh.tb.stop(server)
    print(json.dumps(runs))
    median = {f: statistics.median(mbit for mbit, _ in r) for f, r in runs.items()}
    print(f"inner IPv6/IPv4 median throughput ratio: {median['ipv6'] / median['ipv4']:.2f}")


if __name__ == "__main__":
    main()
