"""The host side: one module per OS concern (TUN, UDP socket, routes and
rules, NAT, sysctls, systemd notify, control socket, file watch, hooks,
name resolution). Each change to the host is idempotent and has its exact
inverse. Nothing here imports the protocol core (alpaca/protocol/); only
alpaca/daemon.py joins the two (tests/test_layout.py)."""
