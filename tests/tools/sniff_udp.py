"""Capture UDP payloads sent to a port, as hex lines (tier-3 tests use it to replay datagrams).

usage: sniff_udp.py IFNAME PORT COUNT TIMEOUT [SOURCE_IP]
"""
import socket
import sys
import time

ifname, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
source = socket.inet_aton(sys.argv[5]) if len(sys.argv) > 5 else None
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
sock.bind((ifname, 0))
sock.settimeout(0.2)
deadline = time.monotonic() + timeout
print("ready", flush=True)
got = 0
while got < count and time.monotonic() < deadline:
    try:
        frame, info = sock.recvfrom(65535)
    except socket.timeout:
        continue
    if info[2] == socket.PACKET_OUTGOING:
        continue
    ip = frame[14:]
    if ip[9] != 17 or (source is not None and ip[12:16] != source):
        continue
    ihl = (ip[0] & 0x0F) * 4
    udp = ip[ihl:]
    if int.from_bytes(udp[2:4], "big") != port:
        continue
    print(udp[8:int.from_bytes(udp[4:6], "big")].hex(), flush=True)
    got += 1
