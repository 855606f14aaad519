"""Telling a running job's agents about new ``minSize``/``maxSize`` (an edit of the TrainingJob).

Pods keep the ``--nnodes MIN:MAX`` they were created with. When the job's spec generation is
newer than the one any of its pods was created with, the operator writes the new limits into
the job's round document in the rendezvous store (``lattice/runtime/rendezvous/limits.py``),
where every running agent acts on them at once. Best effort, on a thread of its own so the
reconcile never waits on the store: a store that cannot be reached is logged and retried at
the next reconcile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from lattice.runtime.kv import create_backend
from lattice.runtime.rendezvous.limits import publish_limits

log = logging.getLogger("lattice.operator")
_published: dict[tuple[str, str, str], int] = {}  # job (with its uid) -> the generation whose limits are in its store
_guard = threading.Lock()


def pod_generations(pods: Iterable[Mapping[str, Any]]) -> Iterator[int]:
    """The spec generation each pod was created with (its ``LATTICE_SPEC_GENERATION``)."""
    for pod in pods:
        for container in (pod.get("spec") or {}).get("containers") or []:
            for env in container.get("env") or []:
                if env.get("name") == "LATTICE_SPEC_GENERATION" and str(env.get("value", "")).isdigit():
                    yield int(env["value"])


def publish_if_stale(spec: Any, pods: Iterable[Mapping[str, Any]]) -> threading.Thread | None:
    """Start publishing ``spec``'s limits if a pod runs an older generation; returns the thread."""
    key, rdzv = (spec.namespace, spec.name, spec.uid), spec.rendezvous  # a recreated job starts at generation 1
    if rdzv is None or not rdzv.endpoint or not any(g < spec.generation for g in pod_generations(pods)):
        return None
    with _guard:
        if _published.get(key, 0) >= spec.generation:
            return None
        _published[key] = spec.generation  # one attempt at a time; reset below if it fails
    thread = threading.Thread(target=_publish, args=(spec, key), name=f"limits-{spec.name}", daemon=True)
    thread.start()
    return thread


def _publish(spec: Any, key: tuple[str, str, str]) -> None:
    rdzv = spec.rendezvous
    url = rdzv.endpoint if "://" in rdzv.endpoint else f"http://{rdzv.endpoint}"
    try:
        store = create_backend(rdzv.backend, url=url)
        try:
            wrote = publish_limits(store, spec.name, spec.generation, spec.min_size, spec.max_size)
        finally:
            store.close()
    except Exception as exc:  # the store is down or refuses: try again at the next reconcile
        with _guard:
            if _published.get(key) == spec.generation:
                del _published[key]
        log.warning("could not publish the limits %d..%d of %s/%s (generation %d) to %s: %s", spec.min_size,
                    spec.max_size, spec.namespace, spec.name, spec.generation, url, exc)
        return
    if wrote:
        log.info("published the limits %d..%d of %s/%s (generation %d) to its running agents", spec.min_size,
                 spec.max_size, spec.namespace, spec.name, spec.generation)
