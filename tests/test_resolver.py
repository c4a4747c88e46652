"""alpaca/host/resolver.py: host names are resolved in a worker thread; the loop's
lookup never blocks (tier 1, with a fake resolve function)."""

from __future__ import annotations

import threading
import time

from alpaca.host.resolver import Resolver


class FakeDns:
    def __init__(self):
        self.answers: dict[str, str | None] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.asked: list[str] = []

    def __call__(self, host: str) -> str | None:
        self.asked.append(host)
        self.gate.wait()
        return self.answers.get(host)


def until(cond, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_literals_are_answered_and_names_are_looked_up_in_the_background():
    dns, moved = FakeDns(), []
    dns.answers["s2.example"] = "192.0.2.2"
    r = Resolver(lambda: moved.append(1), dns)
    try:
        assert r.lookup("192.0.2.9") == "192.0.2.9" and dns.asked == []
        assert r.lookup("s2.example") is None               # not known yet: queued, not waited for
        assert until(lambda: moved) and r.lookup("s2.example") == "192.0.2.2"
        assert dns.asked == ["s2.example"]
    finally:
        r.close()


def test_a_resolver_that_never_answers_blocks_no_lookup():
    dns, moved = FakeDns(), []
    dns.gate.clear()                                       # the DNS server never answers
    r = Resolver(lambda: moved.append(1), dns)
    try:
        started = time.monotonic()
        assert r.lookup("dead.example") is None
        assert r.wait(["dead.example"], timeout=0.2) == ["dead.example"]
        for _ in range(1000):
            r.lookup("dead.example")
            r.refresh_all()
        assert time.monotonic() - started < 1.0 and dns.asked == ["dead.example"]   # one query in flight
    finally:
        dns.gate.set()
        r.close()


def test_a_failed_lookup_keeps_the_last_good_address():
    dns, moved = FakeDns(), []
    dns.answers["s2.example"] = "192.0.2.2"
    r = Resolver(lambda: moved.append(1), dns)
    try:
        assert r.wait(["s2.example"]) == [] and r.lookup("s2.example") == "192.0.2.2" and len(moved) == 1
        dns.answers["s2.example"] = None                  # DNS outage
        r.refresh_all()
        assert until(lambda: dns.asked.count("s2.example") == 2)
        time.sleep(0.05)
        assert r.lookup("s2.example") == "192.0.2.2" and len(moved) == 1
        dns.answers["s2.example"] = "192.0.2.22"          # the address moved: the loop is told
        r.refresh_all()
        assert until(lambda: len(moved) == 2) and r.lookup("s2.example") == "192.0.2.22"
    finally:
        r.close()
