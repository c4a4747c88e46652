"""Protocol-core CPU of one 64 KiB TUN super-packet, sent, received and relayed, for one or more checkouts.

    .venv/bin/python bench/core_micro.py [--messages 1000] [--rounds 3] [--size 64000] [--fec M]
                                         [--trees this,before=/tmp/alpaca-before]

Pure core, no sockets: a client node seals a TCP super-packet (offloads
on, the default config but for `fec`) into shards, and a server node takes
them as one receive batch, as a GRO train arrives. The client's path at
the server is proven first, as a challenge would. Then a forwarder
relays the shards of the same super-packet, sent through it, taken as one
receive batch. Process CPU time of each
side, per message, for each tree in turn, round after round (each tree
runs in its own interpreter, so two checkouts never share imports).
Prints microseconds per message. Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE_TREE = r'''
import json, sys, time
sys.path[:0] = [TREE, TREE + "/tests"]
import test_fragments as tf
from protocol_helpers import T0, addr
from alpaca.protocol.ids import parse_id
client, server = tf.pair(fec=FEC)
packet, frm, now = tf.super_packet(SIZE), addr("16.1"), T0


def one(now):
    t0 = time.process_time()
    shards = [d for d, _ in client.from_tun([packet], now).sends]
    t1 = time.process_time()
    out = server.from_udp([(d, frm) for d in shards], now)
    t2 = time.process_time()
    assert out.tun == [packet]
    return t1 - t0, t2 - t1, len(shards)


one(now)
server.table.get(parse_id("16.1")).paths[frm].proven = True      # as if it had answered a challenge
for _ in range(20):
    now += 0.0001
    one(now)
send = receive = 0.0
for _ in range(MESSAGES):
    now += 0.0001
    s, r, n = one(now)
    send += s
    receive += r

# a forwarder relays the same super-packet's shards, one receive batch of
# views into one buffer (as Udp.recv_batch hands a GRO train over)
from protocol_helpers import make_node
via = make_node("16.1", gateway="1.1", forwarders=("1.2",), vnet=True, fec=FEC)
forwarder = make_node("1.2", mode="forwarder")
tf.acquainted(via, forwarder, server)


def relay_one(now):
    sends = via.from_tun([packet], now).sends
    size = len(sends[0][0])
    buf = memoryview(b"".join(d for d, _ in sends))
    batch = [(buf[i:i + size], frm) for i in range(0, len(buf), size)]
    t0 = time.process_time()
    out = forwarder.from_udp(batch, now)
    t1 = time.process_time()
    assert len(out.sends) == len(sends)
    return t1 - t0


for _ in range(20):
    now += 0.0001
    relay_one(now)
relay = 0.0
for _ in range(MESSAGES):
    now += 0.0001
    relay += relay_one(now)
print(json.dumps({"send_us": 1e6 * send / MESSAGES, "receive_us": 1e6 * receive / MESSAGES,
                  "relay_us": 1e6 * relay / MESSAGES, "shards": n}))
'''


def run_tree(src: Path, args) -> dict:
    code = (ONE_TREE.replace("TREE", repr(str(src))).replace("FEC", repr(None if args.fec is None else (10, args.fec)))
            .replace("SIZE", str(args.size)).replace("MESSAGES", str(args.messages)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=64000, help="TCP payload bytes of the super-packet")
    ap.add_argument("--fec", type=int, default=None, help="parity shards per 10 data shards (default: none)")
    ap.add_argument("--trees", default="this", help='"this" and/or NAME=DIR, comma-separated')
    args = ap.parse_args(argv)
    trees = []
    for item in args.trees.split(","):
        name, _, src = item.strip().partition("=")
        trees.append((name, Path(src).resolve() if src else ROOT))
    for rnd in range(1, args.rounds + 1):
        for name, src in trees:
            res = run_tree(src, args)
            print(f"round {rnd} {name:<10} {res['shards']} shards: send {res['send_us']:6.1f} us, "
                  f"receive {res['receive_us']:6.1f} us, relay {res['relay_us']:6.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
