"""Capture the UDP datagrams arriving on IFNAME for PORT, one hex line each,
splitting UDP GSO trains (the daemon sends runs of equal-sized datagrams as one
UDP_SEGMENT send; over a veth the packet socket sees the whole train as one
frame). The segment size comes from the virtio-net header (PACKET_VNET_HDR).

usage: sniff_datagrams.py IFNAME PORT COUNT TIMEOUT [SOURCE_IP]
Prints "ready", then one line per datagram, until COUNT or TIMEOUT (or SIGTERM).
"""
import signal
import socket
import struct
import sys
import time

SOL_PACKET = 263
PACKET_VNET_HDR = 15
VNET_HDR = struct.Struct("<BBHHHH")      # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
GSO_UDP_L4 = 5                           # VIRTIO_NET_HDR_GSO_UDP_L4

ifname, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
source = socket.inet_aton(sys.argv[5]) if len(sys.argv) > 5 else None
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
sock.bind((ifname, 0))
sock.settimeout(0.2)
deadline = time.monotonic() + timeout
print("ready", flush=True)
got = 0
while got < count and time.monotonic() < deadline:
    try:
        frame, info = sock.recvfrom(1 << 17)
    except TimeoutError:
        continue
    if info[2] == socket.PACKET_OUTGOING:
        continue
    _flags, gso_type, _hdr_len, gso_size, _cs, _co = VNET_HDR.unpack_from(frame)
    ip = frame[VNET_HDR.size + 14:]
    if ip[9] != 17 or (source is not None and ip[12:16] != source):
        continue
    udp = ip[(ip[0] & 0x0F) * 4:]
    if int.from_bytes(udp[2:4], "big") != port:
        continue
    if gso_type & 0x7F == GSO_UDP_L4 and gso_size:
        # a train (never padded: it is larger than an Ethernet minimum frame):
        # segments of gso_size, the last one possibly shorter
        payload = udp[8:]
        datagrams = [payload[i:i + gso_size] for i in range(0, len(payload), gso_size)]
    else:
        datagrams = [udp[8:int.from_bytes(udp[4:6], "big")]]
    for d in datagrams:
        print(d.hex(), flush=True)
        got += 1
