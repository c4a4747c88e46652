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
                  "inner_src": "16.1",      # the inner packet's source (default: src)
                  "inner_src_ip": "203.0.113.5",  # ... or any IPv4 address
                  "prove": true},           # see PROOF below (default: automatic)
                 ...]}

KEYS (what the AEAD key of the forged datagram is):
    own:PEER     the pair key (M, PEER), which M really holds: derived from
                 M's key string when M is the bigger ID of the pair
    guess        a pair key derived from a freshly guessed key string
    group        the group key itself
    psk:STRING   derived from STRING as the bigger ID's key (the tests use it
                 with the victim's real key as the control: M does not have it)

PROOF (wire version 2, docs/protocol.md §5): a receiver takes datagrams for
itself only in a session that answered one of its challenges, and only
those sealed after the answer. Before a batch whose key is the real key of
its pair and whose receiver is dst (by default: src is M and the key
own:DST, or a psk: key), the tool proves each of the batch's sessions the
way a peer does, without a datagram the receiver would count as a drop: it
sends a challenge sealed in that session; the receiver answers it and,
since the session is new to it, challenges back; the tool answers that
challenge, dated (ts, seq) = (the batch's first ts - 1, 2**20 - 1), so
every datagram of the batch is sealed after the answer. "prove": true or
false overrides the default (a session that is not proven is dropped at
its receiver as `unverified`; a relay carries it like any authentic
datagram). Handshake datagrams are not counted in "sent".

Every datagram carries an ICMP echo request from src's tunnel address to
dst's (net 10.17), so one that got through would show up in TUN counters and
be answered. Datagrams are whole (never shards; tools/forge_shards.py forges
those), in the current wire version (alpaca.protocol.wire). Prints
{"sent": N, "proven": P, "began": T, "ended": T} (Unix times) on stdout,
P the sessions proven.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

from alpaca.protocol.constants import KIND_CHALLENGE, KIND_RESPONSE, SEQ_LIMIT
from alpaca.protocol.crypto import CryptoError, derive_group_key, derive_pair_key, derive_psk_key, genkey
from alpaca.protocol.wire import Header, open_sealed, peek, seal
from alpaca.protocol.ids import parse_id
from alpaca.protocol.inner import checksum

NET = (10, 17)
NONCE = 16                              # bytes of a challenge
PROOF_TRIES = 8                         # challenges sent before giving up on one session
PROOF_WAIT = 0.4                        # seconds to wait for the receiver's challenge after each


def echo_request(src: int | bytes, dst: int, ident: int, seq: int) -> bytes:
    """src: a peer ID (its tunnel address) or a packed IPv4 address."""
    icmp = struct.pack(">BBHHH", 8, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + b"forged by M" + bytes(21)
    icmp = icmp[:2] + struct.pack(">H", checksum(icmp)) + icmp[4:]
    addr = lambda peer: bytes((NET[0], NET[1], peer >> 8, peer & 0xFF))
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident & 0xFFFF, 0x4000, 64, 1, 0,
                         src if isinstance(src, bytes) else addr(src), addr(dst))
    header = header[:10] + struct.pack(">H", checksum(header)) + header[12:]
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


def should_prove(batch: dict, me: int, src: int, dst: int) -> bool:
    """By default: M's own datagrams to the peer whose pair key it holds, and
    datagrams under a psk: key (the tests' control with a real key string)."""
    if "prove" in batch:
        return bool(batch["prove"])
    spec = batch["key"]
    return (src == me and spec.startswith("own:") and parse_id(spec[4:]) == dst) or spec.startswith("psk:")


def prove(sock: socket.socket, group_key: bytes, key: bytes, src: int, dst: int, session: bytes, ts: int,
          to: tuple) -> bool:
    """Challenge dst in `session` (it answers, and challenges back when the
    session is new to it), and answer its challenge dated (ts, SEQ_LIMIT - 1).
    A session dst answers for without challenging back is proven already."""
    mine = set()
    for attempt in range(PROOF_TRIES):
        nonce = os.urandom(NONCE)
        mine.add(nonce)
        # dated now: a node answers a challenge only within its clock window
        # (the answer below carries the date that sets the session's floor)
        header = Header(8, 0, KIND_CHALLENGE, src, dst, session, int(time.time()), SEQ_LIMIT - 2 - attempt)
        sock.sendto(seal(group_key, key, header, nonce), to)
        answered = False
        deadline = time.monotonic() + PROOF_WAIT
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65535)
            except TimeoutError:
                break
            try:
                h = peek(group_key, data)[0]
                if (h.src, h.dst) != (dst, src) or h.kind not in (KIND_CHALLENGE, KIND_RESPONSE):
                    continue
                plaintext = open_sealed(key, h, data)
            except (CryptoError, ValueError, struct.error):
                continue            # not for us: another datagram, or too short to be one
            theirs = plaintext[:len(plaintext) - h.pad]
            if h.kind == KIND_RESPONSE:
                answered = answered or theirs in mine
                continue
            answer = Header(8, 0, KIND_RESPONSE, src, dst, session, ts, SEQ_LIMIT - 1)
            sock.sendto(seal(group_key, key, answer, theirs), to)
            sock.settimeout(None)
            return True
        if answered:
            sock.settimeout(None)
            return True             # answered, not challenged back: the session is proven already
    sock.settimeout(None)
    return False


def main() -> None:
    job = json.load(sys.stdin)
    group_key = derive_group_key(job["group"])
    me = parse_id(job["me"])
    pace = float(job.get("pace", 0.0003))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))             # (challenges come back to this port)
    sent, proven, began = 0, 0, time.time()
    done = set()                          # (to, src, dst, session) proven
    for n, batch in enumerate(job["batches"]):
        src, dst = parse_id(batch["src"]), parse_id(batch["dst"])
        inner_src = (socket.inet_aton(batch["inner_src_ip"]) if "inner_src_ip" in batch
                     else parse_id(batch.get("inner_src", batch["src"])))
        key = pair_key(batch["key"], group_key, me, job["my_key"], src, dst)
        sessions = batch.get("sessions", 1)
        sessions = [os.urandom(8) for _ in range(sessions)] if isinstance(sessions, int) else \
            [bytes.fromhex(s) for s in sessions]
        start, stop = batch.get("seq", [0, 1])
        to = (batch["to"][0], int(batch["to"][1]))
        for session in sessions:
            if should_prove(batch, me, src, dst) and (to, src, dst, session) not in done:
                if not prove(sock, group_key, key, src, dst, session, min(batch["ts"]) - 1, to):
                    raise SystemExit(f"batch {n}: {batch['dst']} never answered a challenge in session "
                                     f"{session.hex()}")
                done.add((to, src, dst, session))
                proven += 1
            for ts in batch["ts"]:
                for seq in range(start, stop):
                    header = Header(batch.get("ttl", 8), batch.get("path", 0), batch.get("kind", 0),
                                    src, dst, session, ts, seq)
                    payload = b"" if batch.get("kind", 0) else echo_request(inner_src, dst, 4000 + n, seq)
                    sock.sendto(seal(group_key, key, header, payload), to)
                    sent += 1
                    if pace:
                        time.sleep(pace)
    print(json.dumps({"sent": sent, "proven": proven, "began": began, "ended": time.time()}), flush=True)


if __name__ == "__main__":
    main()
