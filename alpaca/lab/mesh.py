"""The standard test mesh, and who knows whom in it.

    s1  server 1.1 (the gateway)      s2  server 1.2
    c1  client 16.1: gateway 1.1, through forwarders 1.1 and 1.2
    c2  client 16.2: gateway 1.1

Built by Mesh.add_topology (daemons.py) for the tests (worlds.mesh4_world),
the soak (scripts/soak.py) and, with 1.2 as a forwarder, the demo
(alpaca/demo.py).
"""

from __future__ import annotations

PORT = 1040

# name: (host number on the testbed's bridge, peer ID, config keys)
STANDARD: dict[str, tuple[int, str, dict]] = {
    "s1": (1, "1.1", {"mode": "server"}),
    "s2": (2, "1.2", {"mode": "server"}),
    "c1": (16, "16.1", {"mode": "client", "gateway": "1.1", "forwarders": ["1.1", "1.2"]}),
    "c2": (17, "16.2", {"mode": "client", "gateway": "1.1"}),
}


def secrets_line(peer_id: str, key: str, ip: str | None, ip6: str | None = None) -> str:
    """One secrets.txt line: a peer with an address listens on PORT. An
    IPv6 `ip` goes in the ip6 column."""
    if ip is not None and ":" in ip:
        ip, ip6 = None, ip
    return f"{peer_id} {key} {ip or 'null'} {ip6 or 'null'} {PORT if ip or ip6 else 'null'}"


def secrets_for(topology: dict[str, tuple[int, str, dict]], keys: dict[str, str],
                ips: dict[str, str], ips6: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Each peer's secrets.txt lines: servers and forwarders (with their
    addresses) know everyone; a client knows them and itself only.
    keys: peer ID -> key string; ips: name -> underlay address; ips6: name
    -> IPv6 underlay address, for an underlay of both families."""
    def line(name: str) -> str:
        _, peer_id, config = topology[name]
        if config["mode"] == "client":
            return secrets_line(peer_id, keys[peer_id], None)
        ip6 = (ips6 or {}).get(name)
        return secrets_line(peer_id, keys[peer_id], ips[name], ip6 if ip6 != ips[name] else None)
    infrastructure = [line(n) for n, (_, _, c) in topology.items() if c["mode"] != "client"]
    clients = {n: line(n) for n, (_, _, c) in topology.items() if c["mode"] == "client"}
    return {name: infrastructure + (list(clients.values()) if name not in clients else [clients[name]])
            for name in topology}
