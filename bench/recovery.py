"""Recovery benchmark: time from SIGKILL of a worker to its replacement's next completed step,
torchrun against ``lattice run`` on the same small training script.

The script (written to a temp dir) trains a small MLP with Adam on one worker (no DDP) and
prints ``step N t=<time.time()> pid=<pid>`` after every completed step:

- under ``python -m torch.distributed.run --standalone --nproc-per-node 1 --max-restarts K``
  it saves its own checkpoint every step (``torch.save`` of model, optimizer and step to a
  temp file, then ``os.replace``) and loads it at start;
- under ``lattice run --max-restarts K`` (and ``--no-spares``, for reference) it calls
  ``lattice.register(model=..., optimizer=...)`` and ``lattice.step()`` with a checkpoint
  every step.

Each launcher runs once and its worker is SIGKILLed ``--kills`` times (the launcher is never
touched). A kill comes ``--settle`` seconds after the previous recovery, so each launcher is
back in its steady state (Lattice has replaced the spare it used). The recovery time is the
``t=`` of the first step line printed by a new worker minus the time of the kill; the table
shows the median, the ratio to torchrun and the target (Lattice <= 0.5x torchrun). For
``lattice run`` the agent's log splits each recovery into: kill -> agent saw the failure,
-> new worker started (stop, restart budget, rendezvous, handoff), -> first step (restore
and one step in the worker).

    .venv/bin/python bench/recovery.py [--kills 5] [--settle 8] [--only torchrun,lattice,lattice-no-spares]
"""

from __future__ import annotations

import argparse
import datetime
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SCRIPT = r'''
import os, sys, time
import torch

mode, ckpt, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.randn(64, 256), torch.randn(64, 256)
print(f"pid {os.getpid()}", flush=True)

if mode == "lattice":
    import lattice
    lattice.configure(every_steps=1, checkpoint_dir=ckpt)
    state = lattice.register(model=model, optimizer=opt)
    step = state.step
else:
    step = 0
    if os.path.exists(ckpt):
        saved = torch.load(ckpt)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step = saved["step"]

while True:
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    if mode == "lattice":
        lattice.step()
    else:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
    print(f"step {step} t={time.time():.6f} pid={os.getpid()}", flush=True)
    time.sleep(sleep)
'''

STEP = re.compile(r"step (\d+) t=([\d.]+) pid=(\d+)")
PID = re.compile(r"(?:^|\]: )pid (\d+)$")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO lattice\.agent: .*?\] (.*)$")


class Run:
    """A launcher process whose merged output is read into a queue of (arrival time, line)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]):
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.log: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.log.append((time.time(), line))
            self.lines.put((time.time(), line))

    def next(self, deadline: float) -> str:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and self.lines.empty():
                tail = "\n".join(ln for _, ln in self.log[-30:])
                raise RuntimeError(f"launcher stopped or timed out (exit {self.proc.poll()}); last output:\n{tail}")
            try:
                return self.lines.get(timeout=min(left, 0.5))[1]
            except queue.Empty:
                continue

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def measure(name: str, args: list[str], cwd: Path, env: dict[str, str], kills: int, settle: float,
            warmup: float, timeout: float) -> tuple[list[float], list[tuple[float, float, float]]]:
    """SIGKILL the worker ``kills`` times; (recovery times, lattice agent breakdowns)."""
    run = Run(args, cwd, env)
    times: list[float] = []
    kill_times: list[float] = []
    try:
        pid, settled_at = None, time.monotonic() + warmup
        while len(times) < kills:
            line = run.next(time.monotonic() + timeout)
            if m := PID.search(line):
                pid = int(m.group(1))
            m = STEP.search(line)
            if not m or pid is None or time.monotonic() < settled_at:
                continue
            if int(m.group(3)) != pid:
                continue
            killed = pid
            os.kill(killed, signal.SIGKILL)
            t_kill = time.time()
            kill_times.append(t_kill)
            deadline = time.monotonic() + timeout
            while True:
                m = STEP.search(run.next(deadline))
                if m and int(m.group(3)) != killed:
                    break
            times.append(float(m.group(2)) - t_kill)
            pid = int(m.group(3))
            print(f"  {name}: kill {len(times)}: {times[-1]:.3f} s", file=sys.stderr, flush=True)
            settled_at = time.monotonic() + settle
    finally:
        run.stop()
    return times, breakdown(run.log, kill_times)


def breakdown(log: list[tuple[float, str]], kills: list[float]) -> list[tuple[float, float, float]]:
    """Per kill, from the agent's log: (kill -> failure seen, -> worker started, -> first step)."""
    events = []
    for _, line in log:
        if m := LOG_TIME.match(line):
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((t, m.group(2)))
    out = []
    for t_kill in kills:
        seen = next((t for t, msg in events if t >= t_kill - 0.002 and "ended: failed" in msg), None)
        started = next((t for t, msg in events if seen and t >= seen and msg.startswith("started ")), None)
        step = next((float(m.group(2)) for _, ln in log if (m := STEP.search(ln)) and float(m.group(2)) > t_kill),
                    None)
        if seen and started and step:
            out.append((seen - t_kill, started - seen, step - started))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--settle", type=float, default=8.0, help="seconds between a recovery and the next kill")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds after the launch before the first kill")
    p.add_argument("--step-sleep", type=float, default=0.02, help="seconds each step sleeps after its work")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a recovery")
    p.add_argument("--only", default="torchrun,lattice,lattice-no-spares")
    a = p.parse_args()

    python = sys.executable
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    restarts = str(a.kills + 5)
    results: dict[str, tuple[list[float], list[tuple[float, float, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="lattice-recovery-") as tmp:
        work = Path(tmp)
        script = work / "train.py"
        script.write_text(SCRIPT)
        launchers = {
            "torchrun": [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                         "--max-restarts", restarts, str(script), "torchrun", str(work / "torchrun.pt"),
                         str(a.step_sleep)],
            "lattice": [python, "-m", "lattice.cli", "run", "--max-restarts", restarts,
                        "--checkpoint-dir", str(work / "ckpt-lattice"), str(script), "lattice",
                        str(work / "ckpt-lattice"), str(a.step_sleep)],
            "lattice-no-spares": [python, "-m", "lattice.cli", "run", "--no-spares", "--max-restarts", restarts,
                                  "--checkpoint-dir", str(work / "ckpt-nospares"), str(script), "lattice",
                                  str(work / "ckpt-nospares"), str(a.step_sleep)],
        }
        for name in a.only.split(","):
            print(f"{name}: {a.kills} kills", file=sys.stderr, flush=True)
            results[name] = measure(name, launchers[name], work, env, a.kills, a.settle, a.warmup, a.timeout)

    labels = {"torchrun": "torchrun --max-restarts", "lattice": "lattice run",
              "lattice-no-spares": "lattice run --no-spares"}
    base = statistics.median(results["torchrun"][0]) if "torchrun" in results else None
    print(f"\nRecovery: SIGKILL of the worker -> next completed step (s), median of {a.kills}, "
          f"1 worker, checkpoint every step\n")
    print(f"| {'launcher':<24} | {'median':>7} | {'vs torchrun':>11} | {'all runs':<40} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 13}|{'-' * 42}|")
    for name, (times, _) in results.items():
        med = statistics.median(times)
        ratio = f"{med / base:.2f}x" if base else "-"
        runs = " ".join(f"{t:.2f}" for t in times)
        print(f"| {labels[name]:<24} | {med:>7.3f} | {ratio:>11} | {runs:<40} |")
    if base and "lattice" in results:
        ratio = statistics.median(results["lattice"][0]) / base
        print(f"\ntarget: lattice run <= 0.5x torchrun: {ratio:.2f}x, {'met' if ratio <= 0.5 else 'MISSED'}")
    for name in ("lattice", "lattice-no-spares"):
        parts = results.get(name, ([], []))[1]
        if parts:
            cols = [statistics.median(col) for col in zip(*parts, strict=True)]
            print(f"{labels[name]}: medians: kill -> failure seen {cols[0]:.3f} s, -> worker started "
                  f"{cols[1]:.3f} s, -> first step {cols[2]:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
