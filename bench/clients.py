"""A server with many clients, each sending a small steady stream
(docs/benchmarks.md "Many clients").

    .venv/bin/python bench/clients.py [--clients 200] [--rates 1,2,3,4] [--seconds 10]

Two namespaces on the lab's bridge (alpaca.lab.testbed): the server (1.1,
a real daemon with the default config, its secrets.txt listing every
client) and the clients' host, where bench/swarm.py runs N clients (2.1,
2.2, ...) in one process, each the product's protocol core with its own
socket and key. Each client sends IPv4/UDP packets of mixed sizes (--sizes,
cycled) to a counting sink on the server's tunnel address
(bench/swarm_sink.py), at --rates Mbit/s per client, one step per rate,
each on a fresh server. The server is pinned to CPU 0, the clients and the
sink to CPU 1, so the server has one core of its own.

Per step: offered and delivered Mbit/s, the clients that lost any packet
and the worst loss, the server's CPU (share of its core, and seconds per
GB delivered), the server's kernel receive drops, and how late the
clients ran. A step with loss ends the sweep (--all runs every rate).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
from alpaca.lab.mesh import PORT  # noqa: E402
from alpaca.lab.testbed import Testbed, unique_prefix, write_peer_config  # noqa: E402
from alpaca.protocol.ids import parse_id  # noqa: E402

SERVER_TUNNEL = "10.17.1.1"
SINK_PORT = 9000
SIZES = (1400, 80, 1400, 600, 1400, 120)      # mean 833 B: bulk, ACK-sized and middle packets


def client_id(i: int) -> str:
    return f"{2 + i // 250}.{1 + i % 250}"


def pin(pids: list[int], cpu: int) -> None:
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})


def build(tb: Testbed, work: Path, n: int, rate: float, seconds: int, sizes: list[int]) -> tuple[Mesh, Path]:
    """The server's mesh (not started) and the swarm's spec file."""
    mesh = Mesh(tb, work)
    tb.add_host("s1", 1)
    tb.add_host("gen", 2)
    server_line = mesh.line("1.1", tb.hosts["s1"])
    ids = [client_id(i) for i in range(n)]
    mesh.add("s1", 1, {"id": "1.1", "mode": "server"}, [server_line] + [mesh.line(c, None) for c in ids])
    template = write_peer_config(work / "client", {**mesh.defaults, "id": ids[0], "mode": "client",
                                                   "gateway": "1.1"}, [server_line, mesh.line(ids[0], None)])
    spec = {"config": str(template), "bind": tb.hosts["gen"], "dst": SERVER_TUNNEL,
            "server": {"id": parse_id("1.1"), "key": mesh.key("1.1"), "addr": [tb.hosts["s1"], PORT]},
            "clients": [[parse_id(c), mesh.key(c)] for c in ids],
            "rate_bps": rate * 1e6, "seconds": seconds, "sizes": sizes}
    path = work / "swarm.json"
    path.write_text(json.dumps(spec))
    return mesh, path


def peer_drops(status: dict) -> dict[str, int]:
    """The server's drops summed over its peers, by reason."""
    drops: dict[str, int] = {}
    for peer in status["peers"]:
        for reason, count in (peer.get("drops") or {}).items():
            drops[reason] = drops.get(reason, 0) + count
    return drops


def run_swarm(mesh: Mesh, spec: Path) -> tuple[dict, float, float, dict]:
    """Run the swarm; returns its report, the server's CPU seconds during
    the blast, the blast's length, and the server's drops before it (the
    first datagrams of each session, sent before it answered a challenge,
    are dropped as unverified)."""
    server_pids = descendants(mesh.peers["s1"].proc.pid)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    swarm = mesh.tb.popen("gen", ["taskset", "-c", "1", sys.executable, str(ROOT / "bench" / "swarm.py"), str(spec)],
                          stdout=subprocess.PIPE, text=True, env=env)
    cpu0 = t0 = None
    for line in swarm.stdout:
        if line.startswith("blast"):
            cpu0, t0 = cpu_seconds(server_pids), time.time()
            before = peer_drops(mesh.peers["s1"].status())
            print(f"blast started; server pid {mesh.peers['s1'].proc.pid}", file=sys.stderr, flush=True)
        elif line.startswith("done"):
            cpu, length = cpu_seconds(server_pids) - cpu0, time.time() - t0
        elif line.startswith("{"):
            report = json.loads(line)
    swarm.wait(timeout=10)
    if swarm.returncode != 0 or cpu0 is None:
        raise RuntimeError(f"the swarm failed (exit {swarm.returncode})")
    return report, cpu, length, before


def one_step(n: int, rate: float, seconds: int, sizes: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as work, Testbed(unique_prefix()) as tb:
        mesh, spec = build(tb, Path(work), n, rate, seconds, sizes)
        try:
            mesh.start_all()
            pin(descendants(mesh.peers["s1"].proc.pid), 0)
            sink = tb.popen("s1", ["taskset", "-c", "1", sys.executable, str(ROOT / "bench" / "swarm_sink.py"),
                                   SERVER_TUNNEL, str(SINK_PORT), str(n)], stdout=subprocess.PIPE, text=True)
            assert sink.stdout.readline().strip() == "ready"
            report, cpu, length, drops_before = run_swarm(mesh, spec)
            time.sleep(1.0)
            status = mesh.peers["s1"].status()
            sink.send_signal(signal.SIGTERM)
            received = json.loads(sink.stdout.readline())
            sink.wait(timeout=5)
        finally:
            mesh.close()
    drops = {k: v - drops_before.get(k, 0) for k, v in peer_drops(status).items() if v > drops_before.get(k, 0)}
    return summarize(n, rate, sizes, report, received, status, drops, cpu, length)


def summarize(n: int, rate: float, sizes: list[int], report: dict, received: dict, status: dict,
              drops: dict, cpu: float, length: float) -> dict:
    sent, got = report["packets"], received["received"]
    lost = [(s - g) / s for s, g in zip(sent, got) if s]
    delivered_bytes = sum(got) * sum(sizes) / len(sizes)
    return {"clients": n, "rate_mbit_per_client": rate, "offered_mbit": round(n * rate, 1),
            "delivered_mbit": round(delivered_bytes * 8 / length / 1e6, 1),
            "packets_sent": sum(sent), "datagrams_sent": sum(report["datagrams"]), "packets_received": sum(got),
            "clients_with_loss": sum(1 for x in lost if x > 0), "worst_loss": round(max(lost), 5),
            "server_cpu_share": round(cpu / length, 3),
            "server_cpu_s_per_gb": round(cpu / (delivered_bytes / 1e9), 2) if delivered_bytes else None,
            "server_udp_kernel_drops": status.get("udp_kernel_drops"),
            "server_tun_write_errors": status.get("tun_write_errors"),
            "server_drops_in_blast": drops, "sink_drops": received["sink_drops"],
            "clients_heard_server": report["clients_heard_server"], "sealing_s": report["sealing_seconds"],
            "blast_first_late_s": report["first_late_s"], "blast_worst_late_s": report["worst_late_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rates", default="1,2,3,4", help="Mbit/s per client, one step each")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--all", action="store_true", help="run every rate even after a step with loss")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"clients-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = []
    for rate in (float(r) for r in args.rates.split(",")):
        steps.append(one_step(args.clients, rate, args.seconds, sizes))
        print(json.dumps(steps[-1]), flush=True)
        if steps[-1]["clients_with_loss"] and not args.all:
            break
    Path(args.out).write_text(json.dumps({"args": vars(args), "steps": steps}, indent=1))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
