"""Start gloo ranks as subprocesses of this one: the gloo benchmarks' ranks
(``benchmarks/gloo_bench.launch_workers``, for ``sharded.py`` and ``replicas.py``) and the
distributed tests' (``tests/helpers.run_ranks``) go through :func:`launch_ranks`."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Mapping, Optional, Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(command: Sequence[str], world: int, timeout_s: float, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[Path] = None) -> List[str]:
    """Run ``command`` as ``world`` ranks (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, over
    this environment and ``env``) and wait for all of them; returns one message per failed rank
    with its stderr (none: every rank passed). Ranks still running ``timeout_s`` seconds after the
    start (a collective another rank skipped) are killed. A rendezvous port taken between
    :func:`free_port` and rank 0's bind (other jobs on the machine) is retried once."""
    for attempt in range(2):
        errors = _launch_once(command, world, timeout_s, env or {}, cwd)
        if not errors or attempt or not any("EADDRINUSE" in e or "address already in use" in e.lower()
                                            for e in errors):
            return errors
    return errors


def _launch_once(command: Sequence[str], world: int, timeout_s: float, env: Mapping[str, str],
                 cwd: Optional[Path]) -> List[str]:
    shared = {**os.environ, **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
              "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen(list(command), env={**shared, "RANK": str(rank)}, cwd=cwd, stderr=subprocess.PIPE,
                              text=True) for rank in range(world)]
    errors = []
    deadline = time.monotonic() + timeout_s
    try:
        for rank, proc in enumerate(procs):
            try:
                _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                errors.append(f"rank {rank} still running after {timeout_s:g} s")
                continue
            if proc.returncode != 0:
                errors.append(f"rank {rank} exited with {proc.returncode}:\n{stderr}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return errors
