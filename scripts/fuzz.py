"""Fuzz the whole receive path of the protocol core: the long run.

The harness (inputs, the oracle, the invariant) is tests/fuzz_harness.py,
which tests/test_fuzz_receive.py also runs, briefly. docs/fuzzing.md says
what is checked.

usage: scripts/fuzz.py [--inputs N] [--seed S] [--engine random|atheris]
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):      # this checkout's alpaca, and the harness beside the tests
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fuzz_harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
