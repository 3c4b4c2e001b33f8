"""The e2e suite needs the Envoy binary (`make envoy`); `make test-e2e` runs it, `make test` skips the folder."""
from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("GRAVITY_ENVOY") else ["test_*.py"]
