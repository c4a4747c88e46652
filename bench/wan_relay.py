"""A UDP relay that emulates a WAN path: fixed one-way delay and random loss.

The kernel on the bench machines has no netem, so delay cannot be added with
tc. This relay runs in a namespace of its own between the two tunnel
endpoints (bench/run.py --wan builds it) and is the only way between them:

    ns-a  172.30.1.1 <--veth--> 172.30.1.254  ns-w (relay)  172.30.3.254 <--veth--> 172.30.3.2  ns-b
          tunnel A's peer = 172.30.1.254:P                   tunnel B's peer = 172.30.3.254:P

    wan_relay.py --a-listen 172.30.1.254:P [--a-peer 172.30.1.1:P]
                 --b-listen 172.30.3.254:P [--b-peer 172.30.3.2:P]
                 [--delay-ms 25] [--loss 0.3] [--loss-a2b P] [--loss-b2a P] [--seed N]
                 [--batch 64] [--tick-us 250] [--no-gro] [--no-gso] [--rt-prio N]

Side A and side B each have one UDP socket (--a-listen, --b-listen). What
arrives on A's socket leaves from B's socket to B's peer ("a2b"), and the
other way round ("b2a"), so each endpoint sees the relay's address on its
own link as the address of the other end. A peer given on the command line
is fixed (datagrams from any other address on that side are counted as
`stray` and dropped); a peer left out is learned: the source of the latest
datagram that arrived on that side (one peer per side, the last one wins;
enough for a point-to-point tunnel, and for clients on an ephemeral port).
Datagrams for a side whose peer is not known yet are counted as `no_peer`
and dropped.

Per direction, every datagram is dropped with probability --loss (or
--loss-a2b / --loss-b2a), decided on arrival by a random.Random of its own
(seeded with --seed and --seed + 1, so each direction's loss pattern is
reproducible and independent of the other's and of timing). The survivors
are queued with due time = the time they were read + --delay-ms, in one
deque per direction (FIFO: the delay is fixed, so nothing is reordered).
There is no rate limit and no queue limit: the path has delay and loss but
no bottleneck.

One thread, one select() loop (select, not epoll: microsecond timeouts, so
a datagram never leaves a millisecond late only because epoll rounds up):
wait until a socket is readable or the earliest queued datagram is due;
drain each readable socket (up to --batch datagrams each, one queue entry
per batch, all with the same due time); send everything that is due. The
loop wakes up at most once per --tick-us (250 us): at a few thousand
datagrams a second a wake-up per datagram costs the relay most of a core
(more so at real-time priority, which wakes it at once), batching them
costs a third of that; the price is that a datagram spends --delay-ms plus
0 to about 2 ticks in the relay (it is stamped when read, sent at the first
wake-up after it is due). The
sockets have 16 MiB buffers (SO_RCVBUFFORCE/SO_SNDBUFFORCE as root, else
what the sysctl caps allow). UDP_GRO on receive: a train of equal-size
datagrams that the sender sent with UDP_SEGMENT (GSO) arrives as one buffer
and is cut back into datagrams here, each of which is dropped or kept on its
own. UDP_SEGMENT on send: runs of equal-size datagrams due together go out
in one sendmsg (up to 64 datagrams); where the kernel refuses it, one
sendto per datagram. --rt-prio N runs the relay as SCHED_FIFO N, so that
the tunnel daemons, which use every core they can get, do not delay it.

Output: one line "wan_relay: ready ..." on stderr once both sockets are
bound. SIGUSR1 prints a snapshot of the counters as one JSON line on stdout;
SIGTERM or SIGINT prints the final counters as one JSON line on stdout and
exits 0 (queued datagrams are discarded). Counters per direction: received
(datagrams arrived), dropped (by the random loss), forwarded (handed to the
kernel), send_errors, no_peer, stray, max_queue (datagrams queued at once),
late (sent more than 1 ms after their due time), max_late_ms, gro_trains
(buffers that held more than one datagram), gso_sends; and per socket the
kernel's drop counter (kernel_drops: its receive buffer overflowed, i.e. the
relay did not keep up), the relay's CPU seconds and the parameters.

Stdlib only; Linux only (UDP_GRO, UDP_SEGMENT, SO_MEMINFO).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections import deque

# linux/udp.h, asm-generic/socket.h (the same values as alpaca/host/udp.py)
UDP_SEGMENT, UDP_GRO = 103, 104
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
SO_MEMINFO, SK_MEMINFO_DROPS = 55, 8
GSO_MAX_SEGMENTS = 64          # UDP_MAX_SEGMENTS in the kernel
GSO_MAX_BYTES = 65000          # a GSO send must fit one IP datagram's worth of payload
BUFFER = 16 << 20
RECV_SIZE = 65535
LATE_S = 0.001
_U16 = struct.Struct("=H")
_CMSG_SPACE = socket.CMSG_SPACE(_U16.size)
_GSO_OFF_ERRNOS = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT)


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def open_socket(addr: tuple[str, int], gro: bool) -> tuple[socket.socket, bool]:
    """A bound non-blocking UDP socket with big buffers; returns it and whether UDP_GRO is on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, BUFFER)
        except OSError:                 # not root: capped by net.core.[rw]mem_max
            sock.setsockopt(socket.SOL_SOCKET, plain, BUFFER)
    if gro:
        try:
            sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
        except OSError:
            gro = False
    sock.bind(addr)
    sock.setblocking(False)
    return sock, gro


def kernel_drops(sock: socket.socket) -> int | None:
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (SK_MEMINFO_DROPS + 1))
    except OSError:
        return None
    return struct.unpack_from("=I", info, 4 * SK_MEMINFO_DROPS)[0]


class Side:
    """One end of the path: the relay's socket there and the peer it talks to."""

    def __init__(self, name: str, listen: tuple[str, int], peer: tuple[str, int] | None, gro: bool):
        self.name, self.listen = name, listen
        self.sock, self.gro = open_socket(listen, gro)
        self.fixed = peer is not None
        self.peer = peer


class Direction:
    """Datagrams read on src's socket, delayed, sent from dst's socket to dst's peer."""

    COUNTERS = ("received", "dropped", "forwarded", "send_errors", "no_peer", "stray", "late",
                "gro_trains", "gso_sends")

    def __init__(self, name: str, src: Side, dst: Side, loss: float, seed: int | None):
        self.name, self.src, self.dst, self.loss = name, src, dst, loss
        self.rng = random.Random(seed)
        self.queue: deque[tuple[float, list]] = deque()   # (due, [datagram, ...])
        self.queued = self.max_queue = 0
        self.max_late = 0.0
        for key in self.COUNTERS:
            setattr(self, key, 0)

    def drain(self, due: float, batch: int) -> None:
        """Read up to `batch` buffers from the source socket; queue the survivors of the loss."""
        src = self.src
        recvmsg, gro, fixed, peer = src.sock.recvmsg, src.gro, src.fixed, src.peer
        loss, rnd = self.loss, self.rng.random
        kept: list = []
        keep = kept.append
        received = stray = trains = 0
        for _ in range(batch):
            try:
                data, anc, _flags, addr = recvmsg(RECV_SIZE, _CMSG_SPACE if gro else 0)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:             # e.g. ECONNREFUSED from an earlier ICMP error
                continue
            if addr != peer:
                if fixed:
                    stray += 1
                    continue
                peer = src.peer = addr
            if anc and len(data) > (size := _U16.unpack_from(anc[0][2])[0]):
                trains += 1             # a GRO train: cut it back into its datagrams
                view = memoryview(data)
                parts = [view[i:i + size] for i in range(0, len(data), size)]
                received += len(parts)
                kept.extend([d for d in parts if rnd() >= loss] if loss else parts)
            else:
                received += 1
                if not loss or rnd() >= loss:
                    keep(data)
        self.received += received
        self.dropped += received - len(kept)
        self.stray += stray
        self.gro_trains += trains
        if kept:
            self.queue.append((due, kept))
            self.queued += len(kept)
            self.max_queue = max(self.max_queue, self.queued)

    def flush(self, now: float, gso: bool) -> bool:
        """Send every queued datagram that is due; returns whether UDP_SEGMENT still works."""
        queue, dst = self.queue, self.dst
        peer = dst.peer
        while queue and queue[0][0] <= now:
            due, datagrams = queue.popleft()
            self.queued -= len(datagrams)
            late = now - due
            if late > LATE_S:
                self.late += len(datagrams)
                self.max_late = max(self.max_late, late)
            if peer is None:
                self.no_peer += len(datagrams)
                continue
            gso = self._send(datagrams, peer, gso)
        return gso

    def _send(self, datagrams: list, peer: tuple[str, int], gso: bool) -> bool:
        sock = self.dst.sock
        i, n = 0, len(datagrams)
        while i < n:
            size = len(datagrams[i])
            j, total = i + 1, size
            if gso:   # a run of equal sizes; only its last datagram may be shorter
                while j < n and j - i < GSO_MAX_SEGMENTS:
                    nxt = len(datagrams[j])
                    if nxt > size or total + nxt > GSO_MAX_BYTES:
                        break
                    total += nxt
                    j += 1
                    if nxt < size:
                        break
            try:
                if j - i > 1:
                    sock.sendmsg(datagrams[i:j], [(socket.IPPROTO_UDP, UDP_SEGMENT, _U16.pack(size))], 0, peer)
                    self.gso_sends += 1
                else:
                    sock.sendto(datagrams[i], peer)
                self.forwarded += j - i
            except OSError as e:
                if j - i > 1 and e.errno in _GSO_OFF_ERRNOS:
                    gso = False         # the device cannot segment: one by one from now on
                    continue            # the same run again, without GSO
                self.send_errors += j - i
            i = j
        return gso

    def counters(self) -> dict:
        out = {key: getattr(self, key) for key in self.COUNTERS}
        out.update(loss=self.loss, queued=self.queued, max_queue=self.max_queue,
                   max_late_ms=round(1000 * self.max_late, 3))
        return out


class Relay:
    def __init__(self, args):
        self.args = args
        self.delay = args.delay_ms / 1000.0
        self.a = Side("a", args.a_listen, args.a_peer, not args.no_gro)
        self.b = Side("b", args.b_listen, args.b_peer, not args.no_gro)
        loss_a2b = args.loss if args.loss_a2b is None else args.loss_a2b
        loss_b2a = args.loss if args.loss_b2a is None else args.loss_b2a
        seed = args.seed
        self.dirs = [Direction("a2b", self.a, self.b, loss_a2b, seed),
                     Direction("b2a", self.b, self.a, loss_b2a, None if seed is None else seed + 1)]
        self.by_fd = {d.src.sock.fileno(): d for d in self.dirs}
        self.gso = not args.no_gso
        self.t0 = time.monotonic()

    def run(self) -> None:
        by_fd, dirs, delay, batch = self.by_fd, self.dirs, self.delay, self.args.batch
        tick = self.args.tick_us / 1e6
        fds = list(by_fd)
        mono, sel, sleep = time.monotonic, select.select, time.sleep
        last = 0.0
        while True:
            heads = [d.queue[0][0] for d in dirs if d.queue]
            now = mono()
            if tick and now - last < tick:
                sleep(tick - (now - last))
            timeout = max(0.0, min(heads) - mono()) if heads else None
            ready = sel(fds, (), (), timeout)[0]
            now = last = mono()
            for fd in ready:
                by_fd[fd].drain(now + delay, batch)
            now = mono()
            for d in dirs:
                if d.queue and d.queue[0][0] <= now:
                    self.gso = d.flush(now, self.gso)

    def counters(self, final: bool) -> dict:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "final": final,
            "elapsed_s": round(time.monotonic() - self.t0, 3),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
            "params": {"delay_ms": self.args.delay_ms, "seed": self.args.seed, "batch": self.args.batch,
                       "tick_us": self.args.tick_us,
                       "gro": [self.a.gro, self.b.gro], "gso": self.gso, "rt_prio": self.args.rt_prio},
            "peers": {s.name: (f"{s.peer[0]}:{s.peer[1]}" if s.peer else None) for s in (self.a, self.b)},
            "kernel_drops": {s.name: kernel_drops(s.sock) for s in (self.a, self.b)},
            **{d.name: d.counters() for d in self.dirs},
        }

    def report(self, final: bool) -> None:
        sys.stdout.write(json.dumps(self.counters(final)) + "\n")
        sys.stdout.flush()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a-listen", type=host_port, required=True, help="HOST:PORT of the relay on side A")
    ap.add_argument("--a-peer", type=host_port, default=None, help="side A's endpoint (default: learned)")
    ap.add_argument("--b-listen", type=host_port, required=True, help="HOST:PORT of the relay on side B")
    ap.add_argument("--b-peer", type=host_port, default=None, help="side B's endpoint (default: learned)")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay, each direction (25)")
    ap.add_argument("--loss", type=float, default=0.0, help="drop probability, each direction (0)")
    ap.add_argument("--loss-a2b", type=float, default=None, help="A -> B drop probability (default --loss)")
    ap.add_argument("--loss-b2a", type=float, default=None, help="B -> A drop probability (default --loss)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the loss decisions (default: random)")
    ap.add_argument("--batch", type=int, default=64, help="buffers read per socket per wake-up (64)")
    ap.add_argument("--no-gro", action="store_true", help="do not ask for UDP_GRO on the sockets")
    ap.add_argument("--no-gso", action="store_true", help="one sendto per datagram, no UDP_SEGMENT")
    ap.add_argument("--tick-us", type=float, default=250,
                    help="wake up at most once per this many microseconds (250; 0 = whenever needed)")
    ap.add_argument("--rt-prio", type=int, default=0, help="run as SCHED_FIFO with this priority (0: no)")
    args = ap.parse_args(argv)
    for p in (args.loss, args.loss_a2b, args.loss_b2a):
        if p is not None and not 0 <= p <= 1:
            ap.error("loss probabilities must be in [0, 1]")
    if args.delay_ms < 0 or args.batch < 1 or args.tick_us < 0:
        ap.error("--delay-ms and --tick-us must be >= 0, --batch >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rt_prio:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt_prio))
        except OSError as e:        # not root, or a cgroup without a real-time budget
            print(f"wan_relay: SCHED_FIFO {args.rt_prio} refused ({e.strerror}); normal priority",
                  file=sys.stderr, flush=True)
            args.rt_prio = 0
    relay = Relay(args)

    def stop(_signum, _frame):
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, lambda _s, _f: relay.report(False))
    print(f"wan_relay: ready pid {os.getpid()} a {args.a_listen} b {args.b_listen}", file=sys.stderr, flush=True)
    try:
        relay.run()
    finally:
        relay.report(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
