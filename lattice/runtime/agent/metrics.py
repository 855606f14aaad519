"""Prometheus metrics of one agent (``--metrics-port``): rounds, restarts, world size, worker
exits by cause, and its workers' checkpoint stall, persist duration and last committed step."""

from __future__ import annotations

import time
from typing import Any


class Metrics:
    """A private registry served over HTTP; the agent calls ``set``/``worker_exits``/``checkpoint``."""

    def __init__(self, job: str, node: str, port: int | None = None, addr: str = "127.0.0.1"):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        labels = {"job": job, "node": node}
        self._gauges: dict[str, Any] = {}
        for name, doc in (("round", "current rendezvous round"), ("world_size", "agents in the current round"),
                          ("restarts", "worker-failure restarts used by the job"),
                          ("last_committed_step", "newest checkpoint step committed by this node's workers"),
                          ("last_committed_time", "unix time this agent first saw last_committed_step"),
                          ("checkpointing", "1 while a planned stop has the workers checkpoint and exit"),
                          ("checkpoint_stall_seconds", "training time blocked by the last snapshot"),
                          ("checkpoint_persist_seconds", "duration of the last persist+commit"),
                          ("memory_tier", "1 while checkpoints go to the agent's memory tier, else 0"),
                          ("upload_seconds", "duration of the memory tier's last upload to storage"),
                          ("upload_bytes", "bytes of the memory tier's last upload to storage"),
                          ("last_uploaded_step", "newest checkpoint step the memory tier stored")):
            g = prom.Gauge(f"lattice_{name}", doc, list(labels), registry=self.registry)
            self._gauges[name] = g.labels(**labels)
        self._exits = prom.Counter("lattice_worker_exits", "worker exits by cause", [*labels, "cause"],
                                   registry=self.registry)
        self._labels = labels
        self.port = None
        if port is not None:
            server, _ = prom.start_http_server(port, addr=addr, registry=self.registry)
            self.port = server.server_address[1]
            self._server = server

    def set(self, name: str, value: float) -> None:
        self._gauges[name].set(value)

    def worker_exits(self, cause: str, n: int = 1) -> None:
        self._exits.labels(**self._labels, cause=cause).inc(n)

    def checkpoint(self, committed: int | None, stall_s: float, persist_s: float) -> None:
        if committed is not None:
            if committed != self._gauges["last_committed_step"]._value.get():
                self.set("last_committed_time", time.time())
            self.set("last_committed_step", committed)
            self.set("checkpoint_stall_seconds", stall_s)
            self.set("checkpoint_persist_seconds", persist_s)

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
