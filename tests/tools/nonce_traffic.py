"""Send small UDP datagrams to HOST PORT at RATE per second for SECONDS,
ignoring send errors (the route into the tunnel vanishes while the daemon
restarts). The nonce tests use it to keep a daemon sealing datagrams.

usage: nonce_traffic.py HOST PORT RATE SECONDS      prints the number sent
"""
import socket
import sys
import time

host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = tries = 0
start = time.monotonic()
while time.monotonic() - start < seconds:
    tries += 1
    try:
        s.sendto(b"nonce test %d" % tries, (host, port))
        sent += 1
    except OSError:
        pass
    time.sleep(max(0.0, tries / rate - (time.monotonic() - start)))
print(sent, flush=True)
