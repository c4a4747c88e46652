"""`alpaca-tunnel demo`: a small mesh in network namespaces, shown and torn down.

Needs only root and this package. Builds servers 1.1 (gateway) and 1.2
(forwarder), clients 16.1 (gateway 1.1 through forwarders 1.1 and 1.2) and
16.2 (gateway 1.1), and an "internet" host that only server 1.1 can reach,
so clients get there through the tunnel and 1.1's NAT. Runs a real daemon in
each peer, sends traffic, prints each daemon's status, cuts the forwarder's
link to show multi-path at work, and removes everything, also on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .lab.daemons import Mesh
from .lab.mesh import STANDARD
from .lab.testbed import Testbed, wait_for
from .status import format_status

TRANSFER_MB = 16
INTERNET = "172.31.201.2"


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


class Demo:
    # the lab's standard mesh (alpaca/lab/mesh.py), with 1.2 a forwarder, under names that say what they are
    PEERS = {name: STANDARD[std][:2] + ({"mode": "forwarder"} if std == "s2" else STANDARD[std][2],)
             for name, std in (("server1", "s1"), ("fwd1", "s2"), ("client1", "c1"), ("client2", "c2"))}

    def __init__(self, workdir: Path):
        self.mesh = Mesh(Testbed(f"ad{os.getpid() % 100000}", subnet=78), workdir,
                         defaults={"group": "demo", "name": "alpaca0"})
        self.tb = self.mesh.tb

    def build(self) -> None:
        self.mesh.add_topology(self.PEERS)
        for name, (_, pid, _) in self.PEERS.items():
            say(f"namespace {self.tb.ns(name)}: {name} (peer {pid}) at {self.mesh.ip[name]}")
        self.tb.add_link("server1", "internet", "172.31.201.1", INTERNET)
        say(f"namespace {self.tb.ns('internet')}: internet host at {INTERNET}, linked to server1 only")

    def start(self) -> None:
        self.mesh.start_all(timeout=15)
        say("4 daemons running; waiting for the clients' first keepalives")
        wait_for(lambda: all(p["up"] for p in self.status("server1").get("peers", []) if p["id"].startswith("16.")),
                 10)

    def status(self, name: str) -> dict:
        try:
            return self.mesh.peers[name].status()
        except RuntimeError:
            return {}

    def ping(self, name: str, address: str, count: int = 10) -> str:
        r = self.tb.run(name, ["ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", "1", address])
        summary = [l for l in r.stdout.splitlines() if "packets transmitted" in l or "rtt" in l]
        return "; ".join(summary) or r.stderr.strip()

    def transfer(self) -> None:
        try:
            seconds = self.mesh.transfer("client1", "server1", "10.17.1.1", TRANSFER_MB << 20)
        except RuntimeError as e:
            say(f"TCP transfer FAILED: {e}")
            return
        rate = (TRANSFER_MB << 20) * 8 / seconds / 1e6
        say(f"TCP {TRANSFER_MB} MiB client1 -> server1: sha256 matches, {rate:.0f} Mbit/s")

    def show(self) -> None:
        for name in self.PEERS:
            print()
            print(f"---- alpaca-tunnel status on {name}")
            status = self.status(name)
            print(format_status(status) if status else "(no answer)")
        print()

    def cut_forwarder(self, down: bool) -> None:
        from pyroute2 import NetNS
        with NetNS(self.tb.ns("fwd1")) as ns:
            ns.link("set", index=ns.link_lookup(ifname="eth0")[0], state="down" if down else "up")

    def close(self) -> None:
        self.mesh.close()


def run_demo(keep: bool = False) -> int:
    if os.geteuid() != 0:
        print("alpaca-tunnel: the demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="alpaca-demo-"))
    demo = None
    main_pid = os.getpid()

    def on_term(*_):
        # SIGTERM tears down like Ctrl-C; helper processes that pyroute2 forks
        # inherit this handler and must just exit, not tear down
        if os.getpid() != main_pid:
            os._exit(0)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    try:
        demo = Demo(workdir)
        demo.build()
        demo.start()
        say("ping client1 -> server1 (10.17.1.1), sent directly and through forwarder 1.2 at once:")
        say("  " + demo.ping("client1", "10.17.1.1", 20))
        say("ping client1 -> client2 (10.17.16.2), client to client through server1:")
        say("  " + demo.ping("client1", "10.17.16.2", 10))
        say(f"ping client2 -> internet host ({INTERNET}): the client's default route goes into the tunnel,")
        say("  server1 masquerades it (python-iptables rules tagged alpaca-tunnel:alpaca0):")
        say("  " + demo.ping("client2", INTERNET, 10))
        demo.transfer()
        demo.show()
        say("cutting forwarder 1.2's link: client1 keeps its direct path")
        demo.cut_forwarder(True)
        say("  " + demo.ping("client1", "10.17.1.1", 20))
        demo.cut_forwarder(False)
        say("forwarder link restored")
        print(format_status(demo.status("client1")))
        say(f"done in {time.monotonic() - started:.0f} s; tearing down")
        return 0
    except KeyboardInterrupt:
        say("interrupted; tearing down")
        return 130
    except Exception as e:   # the demo must always clean up and say why in one line
        say(f"failed: {e}")
        return 1
    finally:
        if demo is not None:
            demo.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        say("all namespaces and daemons removed")
