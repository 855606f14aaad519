"""Running the ranks of a fake multi-process job as real processes, each in its own process group
that is killed if the test gives up on it (on a timeout, a failed assertion, an interrupt)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


def run_ranks(argv: list[str], envs: dict[int, dict[str, str]], timeout: float = 60.0) -> dict[int, tuple[int, str, str]]:
    """Start ``python argv...`` once per rank with ``os.environ`` plus ``envs[rank]``, all at once;
    wait for each; returns ``{rank: (exit code, stdout, stderr)}``."""
    procs = {r: subprocess.Popen([sys.executable, *argv], env={**os.environ, **env}, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for r, env in envs.items()}
    out = {}
    try:
        for r, p in procs.items():
            stdout, stderr = p.communicate(timeout=timeout)
            out[r] = (p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return out


def rank_env(rank: int, world: int, job: str, round_: int = 0) -> dict[str, str]:
    """The environment torchrun / the agent give a rank (the part Lattice reads)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LATTICE_JOB": job, "LATTICE_ROUND": str(round_)}


def last_json(stdout: str) -> dict | None:
    """The last line of ``stdout`` that is a JSON object (what the rank helpers print), or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None
