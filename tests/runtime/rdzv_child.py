"""A rendezvous agent as its own process, for the multi-process tests.

Usage: ``python rdzv_child.py BACKEND URL JOB NODE MIN MAX TTL``. Prints one JSON
line per assignment (``{"round", "rank", "world", "master"}``) and per event, and
re-joins after every PeerLost, until killed.
"""

from __future__ import annotations

import json
import sys

from lattice.runtime.kv import create_backend
from lattice.runtime.rendezvous.api import JoinPending
from lattice.runtime.rendezvous.decide import Limits
from lattice.runtime.rendezvous.handler import RendezvousHandler


def main(argv: list[str]) -> int:
    backend, url, job, node, lo, hi, ttl = argv
    limits = Limits(int(lo), int(hi), last_call=0.5)
    h = RendezvousHandler(create_backend(backend, url=url), job, node, limits, ttl=float(ttl))
    while True:
        a = h.join(60)
        print(json.dumps({"node": node, "round": a.round, "rank": a.rank, "world": a.world,
                          "master": a.master.node}), flush=True)
        while (event := h.next_event(60)) is None or isinstance(event, JoinPending):
            if event is not None:
                h.request_new_round()
        print(json.dumps({"node": node, "event": type(event).__name__,
                          "nodes": list(event.nodes)}), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
