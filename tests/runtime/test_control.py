"""The agent <-> worker control file: stop requests and the provisional hold of a planned stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from lattice.core.control import ControlFile


def test_stop_is_due_at_and_after_its_step(tmp_path: Path) -> None:
    agent, worker = ControlFile.create(tmp_path / "c"), ControlFile.open(tmp_path / "c")
    assert not worker.stop_requested(5)
    agent.request_stop(7)
    assert not worker.stop_requested(6)
    assert worker.stop_requested(7) and worker.stop_requested(9)


def test_a_hold_blocks_at_its_step_until_the_final_step_comes(tmp_path: Path) -> None:
    agent, worker = ControlFile.create(tmp_path / "c"), ControlFile.open(tmp_path / "c")
    agent.request_hold(5)
    assert not worker.stop_requested(4)  # below the hold: train on, no wait
    answers: list[bool] = []

    def at(step: int) -> None:
        answers.append(worker.stop_requested(step))

    t = threading.Thread(target=at, args=(5,))
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and not answers  # held at step 5
    agent.request_stop(8)  # the agents agreed on a later step: go on
    t.join(5)
    assert answers == [False]
    t = threading.Thread(target=at, args=(8,))
    t.start()
    t.join(5)
    assert answers == [False, True]


def test_a_hold_raised_then_finalised_at_the_held_step_stops_there(tmp_path: Path) -> None:
    agent, worker = ControlFile.create(tmp_path / "c"), ControlFile.open(tmp_path / "c")
    agent.request_hold(5)
    agent.request_hold(6)
    assert not worker.stop_requested(5)
    threading.Timer(0.1, agent.request_stop, args=(6,)).start()
    assert worker.stop_requested(6)


def test_a_hold_nobody_answers_counts_as_a_stop_after_the_limit(tmp_path: Path) -> None:
    agent, worker = ControlFile.create(tmp_path / "c"), ControlFile.open(tmp_path / "c")
    agent.request_hold(3)
    t0 = time.monotonic()
    assert worker.stop_requested(3, hold_limit=0.2)
    assert 0.2 <= time.monotonic() - t0 < 5
