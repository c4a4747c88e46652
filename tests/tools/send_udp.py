"""Send each hex line of stdin as one UDP datagram to HOST PORT."""
import socket
import sys
import time

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for line in sys.stdin.read().split("\n"):
    s.sendto(bytes.fromhex(line.strip()), (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.0005)
