"""Many alpaca clients in one process: the load of bench/clients.py.

    python bench/swarm.py SPEC.json        (run in the clients' namespace)

Each client is the product's own protocol core (alpaca.protocol.node.Node,
with the settings a default client config gives) and its own UDP socket,
so the server sees N peers, each from its own address and port, each with
its own key, session, sequence numbers and keepalives.

Three phases:
1. warm-up, live: every client sends a few packets and answers the
   server's challenges, so the server has proven every session;
2. sealing, ahead of time: each client's steady stream for the measured
   interval is sealed now, stamped with the time it will be sent (the core
   takes `now` as a parameter), with the client's timers (keepalives) run
   in the same virtual time. The server's loss reports would keep each
   client's loss estimate fresh; they cannot reach a timeline sealed in
   advance, so the estimate the warm-up left is held fresh;
3. the blast: the sealed datagrams leave on schedule, a socket call each.
   Sealing ahead keeps this process's cost per datagram to a send, so the
   server, not the generator, is what saturates.

Each client's inner packets are IPv4/UDP to the server's tunnel address,
numbered: 2 bytes client index, 1 byte phase, 4 bytes sequence. Prints
"blast <unix time>" when the blast starts, "done" at its end, then one
JSON line: datagrams and packets sent per client, how late the blast
started and ran.
"""

from __future__ import annotations

import dataclasses
import json
import selectors
import socket
import struct
import sys
import time

from alpaca.config import load_config
from alpaca.daemon import settings_from
from alpaca.protocol.inner import checksum
from alpaca.protocol.node import Node
from alpaca.protocol.peers import PeerEntry

WARMUP_SECONDS = 3.0
WARMUP_INTERVAL = 0.25
SEAL_COST = 40e-6            # seconds per packet sealed, a generous guess for the start time
PORT = 9000


def inner_packet(src: bytes, dst: bytes, index: int, phase: int, seq: int, size: int) -> bytes:
    """An IPv4/UDP packet of `size` bytes carrying (index, phase, seq)."""
    body = struct.pack(">HBI", index, phase, seq)
    body += bytes(max(0, size - 28 - len(body)))
    udp = struct.pack(">HHHH", 40000 + index % 20000, PORT, 8 + len(body), 0) + body
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), seq & 0xFFFF, 0x4000, 64, 17, 0, src, dst)
    return header[:10] + struct.pack(">H", checksum(header)) + header[12:] + udp


class Client:
    def __init__(self, index: int, node: Node, sock: socket.socket, server_id: int, dst: bytes):
        self.index, self.node, self.sock, self.server_id, self.dst = index, node, sock, server_id, dst
        self.src = node.net.address(node.me).packed
        self.seq = 0
        self.packets = 0
        self.datagrams = 0

    def packet(self, phase: int, size: int) -> bytes:
        self.seq += 1
        return inner_packet(self.src, self.dst, self.index, phase, self.seq, size)


def make_clients(spec: dict) -> list[Client]:
    base = settings_from(load_config(spec["config"]))
    server = spec["server"]
    server_entry = PeerEntry(server["key"], (server["addr"][0], server["addr"][1]))
    dst = socket.inet_aton(spec["dst"])
    now = time.time()
    clients = []
    for index, (peer_id, key) in enumerate(spec["clients"]):
        settings = dataclasses.replace(base, my_id=peer_id, vnet=False)
        node = Node(settings, {server["id"]: server_entry, peer_id: PeerEntry(key)}, now)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((spec["bind"], 0))
        sock.setblocking(False)
        clients.append(Client(index, node, sock, server["id"], dst))
    return clients


def send_live(client: Client, sends: list) -> None:
    for data, addr in sends:
        try:
            client.sock.sendto(data, addr)
        except BlockingIOError:
            pass


def warm_up(clients: list[Client]) -> int:
    """Phase 1: a packet from each client every WARMUP_INTERVAL, everything
    heard answered; returns how many clients heard from the server."""
    selector = selectors.EpollSelector()
    for c in clients:
        selector.register(c.sock, selectors.EVENT_READ, c)
    end = time.time() + WARMUP_SECONDS
    next_round = 0.0
    while (now := time.time()) < end:
        if now >= next_round:
            next_round = now + WARMUP_INTERVAL
            for c in clients:
                send_live(c, c.node.from_tun([c.packet(0, 100)], now).sends)
                if now >= c.node.next_deadline():
                    send_live(c, c.node.tick(now).sends)
        for key, _ in selector.select(timeout=0.01):
            c = key.data
            while True:
                try:
                    data, addr = c.sock.recvfrom(65536)
                except BlockingIOError:
                    break
                send_live(c, c.node.from_udp([(data, addr[:2])], time.time()).sends)
    selector.close()
    return sum(1 for c in clients if c.node.table.peers[c.server_id].rx_packets > 0)


def seal_schedule(clients: list[Client], start: float, seconds: float, rate_bps: float,
                  sizes: list[int]) -> list[tuple[float, int, bytes, tuple]]:
    """Phase 2: every client's stream, sealed for when it will be sent.
    Client i's packets are spaced by size / rate, the first offset by i / N
    of one spacing, so the clients do not send in step."""
    schedule = []
    mean = sum(sizes) / len(sizes)
    for c in clients:
        t = start + (c.index / len(clients)) * mean * 8 / rate_bps
        reported = c.node.loss.reported_at
        k = 0
        while t < start + seconds:
            if c.server_id in reported:
                reported[c.server_id] = t
            size = sizes[k % len(sizes)]
            k += 1
            out = c.node.from_tun([c.packet(1, size)], t)
            if t >= c.node.next_deadline():
                out.extend(c.node.tick(t))
            c.packets += 1
            c.datagrams += len(out.sends)
            schedule.extend((t, c.index, data, addr) for data, addr in out.sends)
            t += size * 8 / rate_bps
    schedule.sort(key=lambda e: e[0])
    return schedule


def blast(clients: list[Client], schedule: list) -> tuple[float, float]:
    """Phase 3: send on schedule; returns how late the first and the last
    datagram left (seconds)."""
    socks = [c.sock for c in clients]
    for sock in socks:          # a full send buffer waits, it does not drop
        sock.setblocking(True)
    first_late = time.time() - schedule[0][0]
    sleep, now_fn = time.sleep, time.time
    worst = 0.0
    for t, index, data, addr in schedule:
        now = now_fn()
        if t > now + 0.001:
            sleep(t - now)
        elif now - t > worst:
            worst = now - t
        socks[index].sendto(data, addr)
    return first_late, worst


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    clients = make_clients(spec)
    heard = warm_up(clients)
    rate, seconds, sizes = spec["rate_bps"], spec["seconds"], spec["sizes"]
    expected = len(clients) * seconds * rate / 8 / (sum(sizes) / len(sizes))
    sealing_started = time.time()
    start = sealing_started + expected * SEAL_COST + 1.0
    schedule = seal_schedule(clients, start, seconds, rate, sizes)
    sealing = time.time() - sealing_started
    if time.time() < start:
        time.sleep(start - time.time())
    print(f"blast {time.time()}", flush=True)
    first_late, worst_late = blast(clients, schedule)
    print("done", flush=True)
    print(json.dumps({"clients_heard_server": heard, "sealing_seconds": round(sealing, 2),
                      "first_late_s": round(first_late, 4), "worst_late_s": round(worst_late, 4),
                      "packets": [c.packets for c in clients], "datagrams": [c.datagrams for c in clients]}),
          flush=True)


if __name__ == "__main__":
    main()
