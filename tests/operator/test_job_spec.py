"""Parsing and validating a TrainingJob into a JobSpec: defaults, and errors that name the field."""

from __future__ import annotations

import copy

import pytest

from lattice.core.errors import ConfigError
from lattice.k8s import RendezvousSpec, parse_job

EXAMPLE = {
    "apiVersion": "exabits.ai/v1", "kind": "TrainingJob",
    "metadata": {"name": "example-job", "namespace": "lattice", "generation": 2, "uid": "u"},
    "spec": {"minSize": 1, "maxSize": 3, "replicaSpecs": {"template": {"spec": {"containers": [
        {"name": "trainingjob", "image": "exabits/lattice-resnet", "command": ["python", "-u", "main.py"]}]}}}},
}


def job(**spec_changes) -> dict:
    obj = copy.deepcopy(EXAMPLE)
    for key, value in spec_changes.items():
        if value is None:
            obj["spec"].pop(key, None)
        else:
            obj["spec"][key] = value
    return obj


def test_the_issue_example_parses_with_documented_defaults():
    spec = parse_job(EXAMPLE)
    assert (spec.name, spec.namespace, spec.min_size, spec.max_size) == ("example-job", "lattice", 1, 3)
    assert spec.replicas is None and spec.desired == 3
    assert (spec.max_restarts, spec.nproc_per_node, spec.generation) == (3, 1, 2)
    assert spec.rendezvous is None and spec.checkpoint.url is None
    assert spec.unschedulable_timeout == 120.0 and spec.retry_backoff == 60.0
    assert spec.selector == "exabits.ai/job=example-job"


def test_optional_settings_and_the_default_rendezvous():
    default = RendezvousSpec("consul", "http://consul:8500")
    spec = parse_job(job(replicas=2, maxRestarts=0, nprocPerNode=4,
                         checkpoint={"url": "s3://b/p", "everySteps": 10, "everySeconds": 30, "keep": 2}),
                     default)
    assert spec.desired == 2 and spec.max_restarts == 0 and spec.nproc_per_node == 4
    assert spec.checkpoint.every_seconds == 30.0 and spec.checkpoint.keep == 2
    assert spec.rendezvous == default
    spec = parse_job(job(rendezvous={"backend": "etcd", "endpoint": "http://etcd:2379"}), default)
    assert spec.rendezvous == RendezvousSpec("etcd", "http://etcd:2379")
    spec = parse_job(job(rendezvous={"backend": "consul"}), default)
    assert spec.rendezvous == default


def test_timings_come_from_annotations():
    obj = job()
    obj["metadata"]["annotations"] = {"exabits.ai/unschedulable-timeout": "30", "exabits.ai/retry-backoff": "5"}
    spec = parse_job(obj)
    assert spec.unschedulable_timeout == 30.0 and spec.retry_backoff == 5.0
    obj["metadata"]["annotations"]["exabits.ai/retry-backoff"] = "soon"
    with pytest.raises(ConfigError, match="exabits.ai/retry-backoff"):
        parse_job(obj)


@pytest.mark.parametrize(("changes", "message"), [
    ({"maxSize": 0}, r"spec.maxSize must be >= 1"),
    ({"minSize": 0}, r"spec.minSize must be >= 1"),
    ({"minSize": 3, "maxSize": 2}, r"spec.maxSize \(2\) must be >= spec.minSize \(3\)"),
    ({"minSize": "2"}, r"spec.minSize must be an integer"),
    ({"minSize": True}, r"spec.minSize must be an integer"),
    ({"maxSize": None}, r"spec.maxSize is required"),
    ({"replicas": -1}, r"spec.replicas must be >= 0"),
    ({"replicaSpecs": None}, r"spec.replicaSpecs.template is required"),
    ({"replicaSpecs": {"template": {"spec": {"containers": []}}}}, r"containers must list"),
    ({"replicaSpecs": {"template": {"spec": {"containers": [{"name": "a"}]}}}}, r"containers\[0\] needs"),
    ({"checkpoint": {"everySeconds": 0}}, r"spec.checkpoint.everySeconds must be a number > 0"),
    ({"checkpoint": {"url": ""}}, r"spec.checkpoint.url must be a non-empty string"),
    ({"rendezvous": {"backend": "zookeeper"}}, r"spec.rendezvous.backend 'zookeeper' is unknown"),
    ({"maxRestarts": -1}, r"spec.maxRestarts must be >= 0"),
])
def test_bad_specs_are_rejected_naming_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_job(job(**changes))


def test_wrong_kind_and_missing_name_are_rejected():
    with pytest.raises(ConfigError, match="kind TrainingJob"):
        parse_job({**EXAMPLE, "kind": "Job"})
    with pytest.raises(ConfigError, match="metadata.name is required"):
        parse_job({**EXAMPLE, "metadata": {}})
