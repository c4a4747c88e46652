"""Send a file over one TCP connection."""
import socket
import sys

with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as s, open(sys.argv[3], "rb") as f:
    s.sendfile(f)
