"""The lab: network namespaces with veths (testbed.py) and a booted systemd
in a container (container.py), for the tests, the demo, the soak and the
benchmark. Never used by the daemon itself."""
