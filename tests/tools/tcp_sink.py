"""Accept one TCP connection, read to EOF, print '<bytes> <sha256>'."""
import hashlib
import socket
import sys

srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
srv.settimeout(60)
conn, _ = srv.accept()
h, n = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest(), flush=True)
