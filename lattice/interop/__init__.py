"""Reading Lattice checkpoints without the framework that wrote them, and converting them to and
from other checkpoint formats (orbax here; ``tf.train.Checkpoint`` in ``tf.py``).

``arrays`` needs only numpy; ``orbax`` imports JAX and orbax when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_checkpoint(directory: str | Path, registry: Any, codecs: Any, objects: dict[str, Any], step: int) -> Path:
    """Commit ``objects`` as a Lattice checkpoint of ``step`` in ``directory`` (the importers' last
    stage): a private session with no restore, no RNG capture and no policy; returns its path."""
    from ..core import config
    from ..core.session import Session

    cfg = config.from_env().replace(checkpoint_dir=str(directory), restore=False, capture_rng=False,
                                    every_steps=None, every_seconds=None)
    session = Session(cfg, registry, codecs)
    try:
        session.register(objects)
        session.step = step
        session.checkpoint()
        path = session.wait()
    finally:
        session.close()
    assert path is not None
    return path
