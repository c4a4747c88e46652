"""pytest hooks and shared fixtures. Tier-3 fixtures build real daemons in
network namespaces (alpaca.lab) and always tear them down, also when a
test fails; tier-3 tests are skipped where the lab cannot run."""

from __future__ import annotations

import pytest

from alpaca.lab.testbed import Testbed, missing_for_lab, unique_prefix
from alpaca.lab.worlds import mesh4_world


def pytest_collection_modifyitems(config, items):
    why = missing_for_lab()
    if why:
        skip = pytest.mark.skip(reason=f"tier 3: {why}")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def testbed():
    tb = Testbed(unique_prefix())
    yield tb
    tb.close()


@pytest.fixture(scope="module")
def mesh4(tmp_path_factory):
    with mesh4_world(tmp_path_factory.mktemp("mesh4")) as mesh:
        yield mesh
