"""A group member's forgery kit (tier-3 security tests): seal datagrams that
claim any src/dst under the keys the member can derive, and send them.

The attacker M knows the group name (so the group key: it can unmask and
build headers) and its own secrets.txt key string, nothing else. It reads
one JSON object on stdin:

    {"group": "test", "me": "16.2", "my_key": "<M's key string>",
     "pace": 0.0003,                       # seconds between two sends
     "batches": [{"to": ["172.31.77.1", 1040],
                  "src": "16.1", "dst": "1.1",
                  "key": "own:1.1",         # see KEYS below
                  "sessions": ["<16 hex>", ...] or 3 (that many random),
                  "ts": [1700000000, ...],  # header timestamps
                  "seq": [0, 20],           # range(start, stop)
                  "kind": 0, "path": 0, "ttl": 8,
                  "inner_src": "16.1"},     # the inner packet's source (default: src)
                 ...]}

KEYS (what the AEAD key of the forged datagram is):
    own:PEER     the pair key (M, PEER), which M really holds: derived from
                 M's key string when M is the bigger ID of the pair
    guess        a pair key derived from a freshly guessed key string
    group        the group key itself
    psk:STRING   derived from STRING as the bigger ID's key (the tests use it
                 with the victim's real key as the control: M does not have it)

Every datagram carries an ICMP echo request from src's tunnel address to
dst's (net 10.17), so one that got through would show up in TUN counters and
be answered. Prints {"sent": N, "began": T, "ended": T} (Unix times) on stdout.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

from alpaca.protocol.crypto import derive_group_key, derive_pair_key, derive_psk_key, genkey
from alpaca.protocol.wire import Header, seal
from alpaca.protocol.ids import parse_id

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from protocol_helpers import _checksum  # noqa: E402  (tests/, beside tools/)

NET = (10, 17)


def echo_request(src: int, dst: int, ident: int, seq: int) -> bytes:
    icmp = struct.pack(">BBHHH", 8, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + b"forged by M" + bytes(21)
    icmp = icmp[:2] + struct.pack(">H", _checksum(icmp)) + icmp[4:]
    addr = lambda peer: bytes((NET[0], NET[1], peer >> 8, peer & 0xFF))
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident & 0xFFFF, 0x4000, 64, 1, 0,
                         addr(src), addr(dst))
    header = header[:10] + struct.pack(">H", _checksum(header)) + header[12:]
    return header + icmp


def pair_key(spec: str, group_key: bytes, me: int, my_key: str, src: int, dst: int) -> bytes:
    if spec.startswith("own:"):
        other = parse_id(spec[4:])
        if me < other:
            raise SystemExit(f"M ({me}) is not the bigger ID of ({me}, {other}): it cannot derive that key")
        return derive_pair_key(group_key, derive_psk_key(my_key), me, other)
    if spec == "guess":
        return derive_pair_key(group_key, derive_psk_key(genkey()), src, dst)
    if spec == "group":
        return group_key
    if spec.startswith("psk:"):
        return derive_pair_key(group_key, derive_psk_key(spec[4:]), src, dst)
    raise SystemExit(f"unknown key spec {spec!r}")


def main() -> None:
    job = json.load(sys.stdin)
    group_key = derive_group_key(job["group"])
    me = parse_id(job["me"])
    pace = float(job.get("pace", 0.0003))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent, began = 0, time.time()
    for n, batch in enumerate(job["batches"]):
        src, dst = parse_id(batch["src"]), parse_id(batch["dst"])
        inner_src = parse_id(batch.get("inner_src", batch["src"]))
        key = pair_key(batch["key"], group_key, me, job["my_key"], src, dst)
        sessions = batch.get("sessions", 1)
        sessions = [os.urandom(8) for _ in range(sessions)] if isinstance(sessions, int) else \
            [bytes.fromhex(s) for s in sessions]
        start, stop = batch.get("seq", [0, 1])
        to = (batch["to"][0], int(batch["to"][1]))
        for session in sessions:
            for ts in batch["ts"]:
                for seq in range(start, stop):
                    header = Header(batch.get("ttl", 8), batch.get("path", 0), batch.get("kind", 0),
                                    src, dst, session, ts, seq)
                    payload = b"" if batch.get("kind", 0) else echo_request(inner_src, dst, 4000 + n, seq)
                    sock.sendto(seal(group_key, key, header, payload), to)
                    sent += 1
                    if pace:
                        time.sleep(pace)
    print(json.dumps({"sent": sent, "began": began, "ended": time.time()}), flush=True)


if __name__ == "__main__":
    main()
