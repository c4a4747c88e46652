"""The receiving end of bench/swarm.py, on the server's host: counts the
numbered packets of the blast (phase 1) per client.

    python bench/swarm_sink.py ADDRESS PORT CLIENTS

Prints "ready" once bound; on SIGTERM prints one JSON line: packets
received per client index, and the datagrams the kernel dropped at this
socket for want of buffer (SO_RXQ_OVFL), so a slow sink is not mistaken
for loss in the tunnel.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys

SO_RXQ_OVFL = 40            # asm-generic/socket.h
SO_RCVBUFFORCE = 33


def main() -> None:
    address, port, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    sock.bind((address, port))
    sock.settimeout(0.2)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    counts = [0] * clients
    warmup = dropped = 0
    print("ready", flush=True)
    cmsg_space = socket.CMSG_SPACE(4)
    while not stop:
        try:
            data, ancillary, _, _ = sock.recvmsg(2048, cmsg_space)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL:
                dropped = struct.unpack("I", value[:4])[0]
        index, phase = struct.unpack_from(">HB", data)
        if phase == 1 and index < clients:
            counts[index] += 1
        else:
            warmup += 1
    print(json.dumps({"received": counts, "warmup": warmup, "sink_drops": dropped}), flush=True)


if __name__ == "__main__":
    main()
