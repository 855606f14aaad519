"""Publishing a job's new node limits to its running agents, from outside the job.

An agent's ``--nnodes MIN:MAX`` is fixed when it starts (a Kubernetes pod's command cannot
change). The limits the agents act on travel in the job's round document instead
(``RoundState.sizes``: generation, min, max; ``decide.effective``): an agent of a newer spec
generation publishes its own when it joins. The operator calls :func:`publish_limits` when a
TrainingJob's ``minSize``/``maxSize`` change, so running agents act on them at once, without
waiting for a pod of the new generation: lowering ``minSize`` lets a round that waits for
more workers than remain close with fewer, and raising ``maxSize`` lets waiting agents in.
"""

from __future__ import annotations

from ..kv.api import CASConflict, KVStore
from .api import Keys
from .decide import Limits, RoundState, with_limits


def publish_limits(store: KVStore, job: str, generation: int, min_nodes: int, max_nodes: int) -> bool:
    """Write ``(generation, min, max)`` into ``job``'s round document if it holds older limits.

    Returns True if written; False when the job has no round document yet (its agents bring the
    limits when they start) or already holds limits of this generation or a newer one. The write
    is a compare-and-set, retried on conflicts with the agents' own writes.
    """
    if generation <= 0:
        raise ValueError(f"need a spec generation > 0, got {generation}")
    limits = Limits(min_nodes, max_nodes, generation=generation)  # checks 1 <= min <= max
    key = Keys(job).state
    for _ in range(50):
        entry = store.get(key)
        if entry is None:
            return False
        newer = with_limits(RoundState.from_json(entry.value), limits)
        if newer is None:
            return False
        try:
            store.cas(key, newer.to_json(), entry.mod_index)
            return True
        except CASConflict:
            continue
    raise CASConflict(f"{key}: the round document kept changing; limits of generation {generation} not written")
