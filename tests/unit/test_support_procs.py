"""The test harness's own promise: a test process that dies without teardown takes its servers with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import REPO, redis_server_binary

_CHILD = """
import sys, time
from pathlib import Path
from tests.support.procs import start_redis
server = start_redis(Path(sys.argv[1]))
print(server.popen.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_a_killed_test_process_takes_its_redis_server_with_it(tmp_path: Path) -> None:
    redis_server_binary()  # skips or fails here, not in the child, when the binary is missing
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                          env={**os.environ, "PYTHONPATH": str(REPO)}) as parent:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip(), "the child did not start its redis-server"
        server = int(line)
        assert _alive(server)
        parent.send_signal(signal.SIGKILL)  # no teardown, no atexit: as a pytest killed by a timeout
        parent.wait(10)
    deadline = time.monotonic() + 10
    while _alive(server):
        if time.monotonic() > deadline:
            os.kill(server, signal.SIGKILL)
            pytest.fail("redis-server outlived the process that started it")
        time.sleep(0.05)
