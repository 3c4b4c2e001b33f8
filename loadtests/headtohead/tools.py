"""The machine tools the overhead part needs (nginx, the static upstream; wrk, the load generator),
installed from Debian's packages when missing, as `make install` does for redis-server.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

PACKAGES = {"nginx": "nginx-light", "wrk": "wrk"}


def _find(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin"):  # nginx lives in /usr/sbin, outside a non-root PATH
        if (Path(d) / binary).exists():
            return str(Path(d) / binary)
    return None


def ensure(binaries: tuple[str, ...] = ("nginx", "wrk"), log: Callable[[str], None] = print) -> dict[str, str]:
    """Path of each binary, apt-get installing the missing ones (root only; otherwise say how)."""
    missing = [b for b in binaries if _find(b) is None]
    if missing:
        packages = [PACKAGES[b] for b in missing]
        sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
        if sudo is None or not shutil.which("apt-get"):
            raise SystemExit(f"missing {', '.join(missing)}: apt-get install -y {' '.join(packages)}")
        log(f"installing {' '.join(packages)} with apt-get (first run only)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        # nginx-light's post-install starts the distribution's nginx on :80; the harness runs its own.
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                       check=True, env=env)
        if "nginx" in missing:
            subprocess.run([*sudo, "sh", "-c", "command -v service >/dev/null && service nginx stop || true"],
                           check=False, capture_output=True)
    out = {b: _find(b) for b in binaries}
    absent = [b for b, p in out.items() if p is None]
    if absent:
        raise SystemExit(f"still missing after apt-get: {', '.join(absent)}")
    return {b: str(p) for b, p in out.items()}
