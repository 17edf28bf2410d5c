"""Shared helpers for tests that launch real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RESTART_COUNT")


def child_env(extra: dict | None = None) -> dict[str, str]:
    """The environment of a launched run: this one without a process group's variables (a test
    that built a Trainer in-process leaves RANK/MASTER_PORT/... of its group of one in os.environ,
    and a child would try to join that group's port), one thread, this checkout first on the path."""
    inherited = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    return {**inherited, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra or {})}


def run(args: list[str], timeout: int = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=child_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(args)}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *args],
               timeout=timeout, env=env, check=check)
