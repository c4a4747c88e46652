"""Continuous TCP traffic for scripts/soak.py; runs until killed.

    python -m alpaca.lab.tcp_stream sink BIND PORT
    python -m alpaca.lab.tcp_stream source HOST PORT

sink: accepts any number of connections, reads everything, and prints one line
per second: `<unix time> <total bytes received> <connections accepted>`.
source: one connection at a time, sending as fast as TCP allows; on any error
it reconnects 0.2 s later (TCP_USER_TIMEOUT 10 s, so a dead connection is
noticed). Prints one line per second: `<unix time> <total bytes sent> <connects>`.
"""
import socket
import sys
import threading
import time

stats = {"bytes": 0, "conns": 0}
lock = threading.Lock()


def report() -> None:
    while True:
        time.sleep(1.0)
        with lock:
            print(f"{time.time():.3f} {stats['bytes']} {stats['conns']}", flush=True)


def sink(bind: str, port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    chunk = conn.recv(1 << 16)
                except OSError:
                    return
                if not chunk:
                    return
                with lock:
                    stats["bytes"] += len(chunk)

    while True:
        conn, _ = srv.accept()
        with lock:
            stats["conns"] += 1
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def source(host: str, port: int) -> None:
    data = bytes(1 << 16)
    while True:
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 10000)
                s.settimeout(15)
                with lock:
                    stats["conns"] += 1
                while True:
                    n = s.send(data)
                    with lock:
                        stats["bytes"] += n
        except OSError:
            time.sleep(0.2)


if __name__ == "__main__":
    threading.Thread(target=report, daemon=True).start()
    if sys.argv[1] == "sink":
        sink(sys.argv[2], int(sys.argv[3]))
    else:
        source(sys.argv[2], int(sys.argv[3]))
