"""Flood HOST PORT with garbage for SECONDS; print how many datagrams were sent.

usage: garbage_flood.py HOST PORT SECONDS GROUP SRC DST [PROCS [RATE]]

The pool (4096 datagrams, sent round-robin from one connected socket per
process, in a tight loop):
  - half random bytes, 1..1400 long (mostly `malformed` at the receiver; one
    in 16 unmasks to the previous wire version, counted `wrong_version`);
  - half valid-looking datagrams: the right group key (the header unmasks and
    passes the version check: alpaca.protocol.wire seals the current one),
    src/dst = SRC/DST for every other one and random IDs for the rest, whole
    (not shards), sealed under a random wrong pair key (`auth_failure` /
    `unknown_peer` at the receiver: each costs it an AEAD attempt).
PROCS processes (default 1) send in parallel; the printed count is their sum.
RATE (datagrams/s per process, default 0 = as fast as the CPU allows) paces
each process in bursts of 256.
"""
from __future__ import annotations

import multiprocessing
import random
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from alpaca.protocol.constants import DEFAULT_TTL, KIND_DATA
from alpaca.protocol.crypto import derive_group_key
from alpaca.protocol.wire import Header, seal
from alpaca.protocol.ids import parse_id


def pool(group: str, src: int, dst: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    gk = derive_group_key(group)
    out = []
    for i in range(4096):
        if i % 2:
            out.append(rng.randbytes(rng.randint(1, 1400)))
            continue
        s, d = (src, dst) if i % 4 == 0 else (rng.randint(2, 0xFFFE), rng.randint(2, 0xFFFE))
        header = Header(DEFAULT_TTL, 0, KIND_DATA, s, d, rng.randbytes(8), int(time.time()), rng.randrange(1 << 20))
        out.append(seal(gk, rng.randbytes(32), header, rng.randbytes(rng.randint(0, 1350))))
    return out


def flood(host: str, port: int, seconds: float, rate: float, datagrams: list[bytes], result) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.connect((host, port))
    send = sock.send
    sent = errors = 0
    start = time.monotonic()
    deadline = start + seconds
    n, burst = len(datagrams), 256
    while (now := time.monotonic()) < deadline:
        if rate and sent > (now - start) * rate:
            time.sleep(burst / rate / 4)
            continue
        for i in range(sent, sent + burst):
            try:
                send(datagrams[i % n])
            except OSError:
                errors += 1
        sent += burst
    result.put(sent - errors)


def main() -> None:
    host, port, seconds, group = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    src, dst = parse_id(sys.argv[5]), parse_id(sys.argv[6])
    procs = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    rate = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
    result = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=flood, args=(host, port, seconds, rate, pool(group, src, dst, k), result))
               for k in range(procs)]
    print("ready", flush=True)
    for w in workers:
        w.start()
    total = sum(result.get() for _ in workers)
    for w in workers:
        w.join()
    print(total, flush=True)


if __name__ == "__main__":
    main()
