"""Forwarder throughput: a client's bulk transfer to a server straight, and
through a forwarder, side by side in one run (docs/benchmarks.md "Forwarder").

    .venv/bin/python bench/forwarder.py [--rounds 3] [--seconds 10] [--cc bbr]

Three namespaces on the lab's bridge (alpaca.lab.testbed): server 1.1,
forwarder 1.2, client 16.1. Two meshes are built one after the other, with
the default config: the client with no forwarders (its datagrams go to the
server's address), and the client with `forwarders: ["1.2"]` (every
datagram each way crosses the forwarder, which relays it by its header).
Per round and mesh: one iperf3 TCP stream client -> server through the
tunnel after 6 s of idle, Mbit/s, and each daemon's CPU seconds per GB
moved. The rounds alternate the two meshes; the result is printed and
written as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchproc import cpu_seconds, descendants  # noqa: E402

from alpaca.lab.daemons import Mesh  # noqa: E402
from alpaca.lab.testbed import Testbed, unique_prefix, wait_for  # noqa: E402

SERVER = "10.17.1.1"


def topology(through: bool) -> dict:
    client = {"mode": "client", "gateway": "1.1", **({"forwarders": ["1.2"]} if through else {})}
    return {"s1": (1, "1.1", {"mode": "server"}), "f1": (2, "1.2", {"mode": "forwarder"}),
            "c1": (16, "16.1", client)}


def measure(mesh: Mesh, seconds: int, cc: str, idle: float) -> dict:
    tb = mesh.tb
    sink = tb.popen("s1", ["iperf3", "-s", "-1", "-B", SERVER], stdout=subprocess.DEVNULL)
    try:
        time.sleep(idle)
        pids = {name: descendants(peer.proc.pid) for name, peer in mesh.peers.items()}
        before = {name: cpu_seconds(p) for name, p in pids.items()}
        r = tb.run("c1", ["iperf3", "-c", SERVER, "-t", str(seconds), "-J", "-C", cc], timeout=seconds + 30)
        after = {name: cpu_seconds(p) for name, p in pids.items()}
        result = json.loads(r.stdout)["end"]
        moved = result["sum_received"]["bytes"] / 1e9
        return {"mbit_s": round(result["sum_received"]["bits_per_second"] / 1e6, 1),
                "retransmits": result["sum_sent"].get("retransmits"),
                "cpu_s_per_gb": {n: round((after[n] - before[n]) / moved, 2) for n in pids}}
    finally:
        tb.stop(sink)


def one_round(through: bool, seconds: int, cc: str, idle: float) -> dict:
    with tempfile.TemporaryDirectory() as work:
        mesh = Mesh(Testbed(unique_prefix()), Path(work))
        try:
            mesh.add_topology(topology(through))
            mesh.start_all()
            c1 = mesh.peers["c1"]
            if not wait_for(lambda: c1.run(["ping", "-n", "-c", "1", "-W", "1", SERVER]).returncode == 0, 20):
                raise RuntimeError(f"no ping through the tunnel:\n{c1.log_text()[-2000:]}")
            out = measure(mesh, seconds, cc, idle)
            if through:      # the forwarder carried it: it relayed the client's datagrams
                relayed = next(p for p in mesh.peers["f1"].status()["peers"] if p["id"] == "16.1")
                out["forwarder_relayed_packets"] = relayed["relayed_packets"]
            return out
        finally:
            mesh.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--cc", default="bbr")
    ap.add_argument("--idle", type=float, default=6.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"forwarder-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    args = ap.parse_args()
    runs: dict[str, list] = {"direct": [], "forwarder": []}
    for i in range(args.rounds):
        for name in ("direct", "forwarder"):
            runs[name].append(one_round(name == "forwarder", args.seconds, args.cc, args.idle))
            print(f"round {i + 1} {name:9s} {runs[name][-1]}", flush=True)
    median = {n: statistics.median(r["mbit_s"] for r in rs) for n, rs in runs.items()}
    summary = {"median_mbit_s": median, "forwarder_over_direct": round(median["forwarder"] / median["direct"], 3)}
    print(json.dumps(summary))
    Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=1))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
