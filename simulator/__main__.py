"""`python -m simulator ...`: run a simulated vLLM replica (same flags as `gravity sim`)."""
from __future__ import annotations

import sys

from simulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
