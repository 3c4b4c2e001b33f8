"""`make run` runs `gravity demo`; the README's SDK snippet must work against it."""
from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import openai

from tests.support.procs import Proc, free_port


def _start_demo(tmp_path: Path) -> Proc:
    port = free_port()
    while True:  # the demo's three simulators take base, base+1 and base+2: all must be free
        base = free_port()
        if base + 2 < 65535 and port not in (base + 1, base + 2) and all(_free(base + i) for i in (1, 2)):
            break
    return Proc([sys.executable, "-m", "gateway", "demo", "--port", str(port), "--sim-base-port", str(base),
                 "--state-dir", str(tmp_path / "redis"), "--time-scale", "20"],
                port, tmp_path / "demo.log").start(timeout=60)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_demo_stack_serves_the_readme_snippet(tmp_path: Path) -> None:
    demo = _start_demo(tmp_path)
    try:
        assert "base_url=" in demo.log()  # the snippet is printed for the user
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{demo.port}/v1", api_key="unused", max_retries=2)
        reply = client.chat.completions.create(
            model="sim-llama", messages=[{"role": "user", "content": "Hello!"}])
        assert reply.choices[0].message.content
        chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="sim-llama", messages=[{"role": "user", "content": "Stream, please"}], stream=True)
            if c.choices]
        assert "".join(chunks)
        assert {m.id for m in client.models.list()} == {"sim-llama"}
    finally:
        demo.stop()
    assert demo.popen.returncode is not None


def test_demo_stops_its_simulators(tmp_path: Path) -> None:
    demo = _start_demo(tmp_path)
    pid = demo.popen.pid
    children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert len(children) >= 3
    demo.stop()
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children):
        assert time.monotonic() < deadline, "simulators outlived gravity demo"
        time.sleep(0.1)
    assert demo.popen.returncode in (0, -signal.SIGTERM)
