"""The pure protocol core.

Nothing in this package opens a socket, reads a file or looks at the clock:
every entry point takes `now` (seconds, float) from its caller and returns
what must be sent, written or dropped. The daemon (alpaca.daemon) is the
only place that touches the host.
"""
