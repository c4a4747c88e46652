"""The lab, for the tests, the demo, the soak and the benchmark; never used
by the daemon itself:

- testbed.py: network namespaces joined by veths and a bridge (Testbed),
  unique_prefix, wait_for, write_peer_config;
- daemons.py: real alpaca-tunnel daemons in them (Daemon, Mesh, with a
  SHA-256-checked TCP transfer);
- mesh.py: the standard four-peer topology and its secrets.txt lines;
- worlds.py: ready-made running meshes (mesh4_world, lossy_pair);
- tcp_sink.py, tcp_send.py, tcp_stream.py: traffic tools, run in a
  namespace as `python -m alpaca.lab.<name>`;
- skewed_clock.py: a launcher that runs a daemon with its wall clock off
  the host's (clock-skew tests);
- ipv6_capture.py: the IPv6 packets on a device, one line each (leak tests);
- container.py: a booted systemd in a throwaway container (nspawn)."""
