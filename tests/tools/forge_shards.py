"""Blast forged shard datagrams at HOST PORT for SECONDS: what a holder of
the group name alone can make (any header and sub-header, masked right),
with a random chunk and MAC. Usage: forge_shards.py GROUP SRC DST HOST PORT SECONDS [TTL]
Prints the number sent."""
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from alpaca.protocol.constants import FLAG_FRAG, FLAG_ISAL, KIND_DATA, MASK_SIZE  # noqa: E402
from alpaca.protocol.crypto import derive_group_key, mask_state  # noqa: E402
from alpaca.protocol.ids import parse_id  # noqa: E402
from alpaca.protocol.wire import SUB, Header  # noqa: E402

group, src, dst, host, port, seconds = sys.argv[1:7]
ttl = int(sys.argv[7]) if len(sys.argv) > 7 else 255
state = mask_state(derive_group_key(group))
sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
end, sent, seq = time.monotonic() + float(seconds), 0, 0
k, m, length = 120, 120, 120 * 1400        # as heavy a decode and as much memory as a sub-header may ask
while time.monotonic() < end:
    tail = os.urandom(1400 + 8)
    clear = Header(ttl, 0, KIND_DATA, parse_id(src), parse_id(dst), os.urandom(8), int(time.time()), seq & 0xFFFFF,
                   0, FLAG_FRAG | FLAG_ISAL).pack() + SUB.pack(seq % 240, k, m, length >> 16, length & 0xFFFF)
    h = state.copy()
    h.update(tail[-16:])
    masked = (int.from_bytes(clear, "big") ^ int.from_bytes(h.digest(), "big")).to_bytes(MASK_SIZE, "big")
    try:
        sock.sendto(masked + tail, (host, int(port)))
        sent += 1
    except BlockingIOError:
        pass
    seq += 1
print(sent)
