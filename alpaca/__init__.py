"""alpaca-tunnel: a multi-peer mesh VPN daemon for Linux (see docs/)."""

__version__ = "0.1.0"
