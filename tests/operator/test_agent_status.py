"""The operator learns from each worker pod's agent whether it is mid-checkpoint, its round and its
last checkpoint: the agent's real Prometheus endpoint is read over HTTP and turned into the worker
annotations that reconcile reads (so it never deletes a pod that is checkpointing)."""

from __future__ import annotations

import json

import pytest
from lattice_operator import cluster

from lattice.k8s.observe import annotations_from_metrics, with_agent_status, worker_from_pod
from lattice.runtime.agent.metrics import Metrics


@pytest.fixture
def agent_metrics():
    m = Metrics("job", "node-1", port=0)
    yield m
    m.close()


def _pod(ip: str, phase: str = "Running") -> dict:
    return {"metadata": {"name": "tj-worker-1", "labels": {"exabits.ai/index": "1"}},
            "status": {"phase": phase, "podIP": ip}}


def test_agent_metrics_become_the_worker_annotations(agent_metrics, monkeypatch) -> None:
    agent_metrics.set("round", 3)
    agent_metrics.checkpoint(10, 0.01, 0.2)
    agent_metrics.set("checkpointing", 1)
    monkeypatch.setattr(cluster, "METRICS_PORT", agent_metrics.port)
    api = cluster.Cluster()
    running, pending = _pod("127.0.0.1"), _pod("127.0.0.1", phase="Pending")
    [seen, untouched] = api.with_agent_status([running, pending], "s3://bucket/tj")
    worker = worker_from_pod(seen)
    assert worker is not None and worker.checkpointing and worker.round == 3
    assert worker.last_checkpoint["step"] == 10 and worker.last_checkpoint["url"] == "s3://bucket/tj"
    assert untouched == pending  # only running pods are asked
    agent_metrics.set("checkpointing", 0)
    [seen] = api.with_agent_status([running])
    assert not worker_from_pod(seen).checkpointing


def test_an_agent_that_does_not_answer_leaves_the_pod_as_it_is(monkeypatch) -> None:
    monkeypatch.setattr(cluster, "METRICS_PORT", 9)  # discard port: nothing listens
    pod = _pod("127.0.0.1")
    [seen] = cluster.Cluster().with_agent_status([pod])
    assert seen == pod and not worker_from_pod(seen).checkpointing


def test_parsing_ignores_other_metrics_and_hand_set_annotations_win() -> None:
    text = ("# HELP lattice_round current round\nlattice_round{job=\"j\",node=\"n\"} 7.0\n"
            "lattice_world_size{job=\"j\",node=\"n\"} 2.0\nlattice_checkpointing{job=\"j\",node=\"n\"} 0.0\n")
    assert annotations_from_metrics(text) == {"exabits.ai/checkpointing": "false", "exabits.ai/round": "7"}
    pod = _pod("10.0.0.1")
    pod["metadata"]["annotations"] = {"exabits.ai/checkpointing": "true"}
    merged = with_agent_status(pod, text)
    assert merged["metadata"]["annotations"]["exabits.ai/checkpointing"] == "true"
    assert json.loads(merged["metadata"]["annotations"]["exabits.ai/round"]) == 7
