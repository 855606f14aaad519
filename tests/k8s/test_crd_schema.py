"""The TrainingJob CRD (deploy/crd/trainingjobs.yaml) checked offline: it is a valid
CustomResourceDefinition with a structural schema, and its own schema plus CEL rules (run by
cel-python through ``crd_validator``, a stand-in for the API server) accept the issue's
example and reject bad specs with the schema's messages."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from crd_structural import version_problems
from crd_validator import CRDValidator
from deploy_support import DEPLOY, K8S_VERSION, load_docs
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(120)

CRD_PATH = DEPLOY / "crd" / "trainingjobs.yaml"
EXAMPLE = DEPLOY / "examples" / "example-job.yaml"
ISSUE_EXAMPLE = '''apiVersion: "exabits.ai/v1"
kind: TrainingJob
metadata:
  name: example-job
  namespace: lattice
spec:
  minSize: 1
  maxSize: 3
  replicaSpecs:
    template:
      spec:
        containers:
          - name: trainingjob
            image: exabits/lattice-resnet
            imagePullPolicy: Always
            command: ["python", "-u", "main.py"]
'''
CEL_SKIPPED = "some validation rules were not checked"
MIN_MAX_MESSAGE = "spec.maxSize: Invalid value: \"object\": spec.maxSize must be greater than or equal to spec.minSize"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    (doc,) = load_docs(CRD_PATH)
    return doc


@pytest.fixture(scope="module")
def validator(crd: dict[str, Any]) -> CRDValidator:
    return CRDValidator(crd)


@pytest.fixture
def example() -> dict[str, Any]:
    (doc,) = load_docs(EXAMPLE)
    return doc


def _errors(validator: CRDValidator, obj: dict[str, Any]) -> list[str]:
    return [str(e) for e in validator.validate(obj)]


# ----- the CRD object itself -----
def test_crd_is_a_valid_customresourcedefinition(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_crd_names_scope_and_version(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "trainingjobs.exabits.ai"
    assert (spec["group"], spec["scope"]) == ("exabits.ai", "Namespaced")
    assert spec["names"]["kind"] == "TrainingJob"
    assert (spec["names"]["plural"], spec["names"]["singular"]) == ("trainingjobs", "trainingjob")
    assert spec["names"]["shortNames"] == ["tj"]
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [("v1", True, True)]


def test_crd_schema_is_structural_and_its_paths_resolve(crd: dict[str, Any]) -> None:
    assert version_problems(crd["spec"]["versions"][0]) == []


def test_structural_check_catches_broken_paths(crd: dict[str, Any]) -> None:
    version = copy.deepcopy(crd["spec"]["versions"][0])
    version["subresources"]["scale"]["specReplicasPath"] = ".spec.replicaCount"
    version["additionalPrinterColumns"][0]["jsonPath"] = ".status.phaze"
    del version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["minSize"]["type"]
    problems = version_problems(version)
    assert any("specReplicasPath .spec.replicaCount is not declared" in p for p in problems)
    assert any("column Phase .status.phaze is not declared" in p for p in problems)
    assert any(p.startswith(".spec.minSize: not structural") for p in problems)


def test_scale_subresource_and_printer_columns(crd: dict[str, Any]) -> None:
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Ready", "Desired", "Min", "Max", "Restarts", "Age"]


def test_status_declares_what_the_operator_reports(crd: dict[str, Any]) -> None:
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert set(status["properties"]) >= {"phase", "replicas", "readyReplicas", "restarts", "round",
                                         "lastCheckpoint", "conditions", "observedGeneration",
                                         "selector"}
    assert status["properties"]["phase"]["enum"] == ["Pending", "Running", "Scaling",
                                                     "Restarting", "Succeeded", "Failed"]


def test_every_cel_rule_compiles(validator: CRDValidator) -> None:
    assert validator.compile_rules() == ["self.maxSize >= self.minSize"]


# ----- custom resources against the schema -----
def test_example_file_is_the_issue_example_verbatim() -> None:
    assert EXAMPLE.read_text() == ISSUE_EXAMPLE


def test_issue_example_is_accepted_and_defaulted(validator: CRDValidator, example: dict) -> None:
    assert _errors(validator, example) == []
    spec = validator.prepare(example)["spec"]
    assert (spec["maxRestarts"], spec["nprocPerNode"]) == (3, 1)
    assert "replicas" not in spec  # absent: the operator starts at maxSize


def test_fuller_example_is_accepted(validator: CRDValidator) -> None:
    (doc,) = load_docs(DEPLOY / "examples" / "elastic-job.yaml")
    assert _errors(validator, doc) == []
    assert doc["spec"]["checkpoint"]["url"].startswith("lattice://")


def _mutate(example: dict, path: str, value: Any) -> dict:
    obj = copy.deepcopy(example)
    *parents, last = path.split(".")
    cur = obj
    for part in parents:
        cur = cur.setdefault(part, {})
    if value is _DELETE:
        del cur[last]
    else:
        cur[last] = value
    return obj


_DELETE = object()
BAD_SPECS = [
    ("spec.maxSize", 0, ["spec.maxSize: Invalid value: 0: spec.maxSize in body should be greater than or equal to 1", MIN_MAX_MESSAGE]),
    ("spec.minSize", 0, ["spec.minSize: Invalid value: 0: spec.minSize in body should be greater than or equal to 1"]),
    ("spec.minSize", _DELETE, ["spec.minSize: Required value", CEL_SKIPPED]),
    ("spec.replicaSpecs.template", _DELETE, ["spec.replicaSpecs.template: Required value", CEL_SKIPPED]),
    ("spec.replicaSpecs", _DELETE, ["spec.replicaSpecs: Required value", CEL_SKIPPED]),
    ("spec.minSize", "1", ['spec.minSize: Invalid value: "string": spec.minSize in body must be of type integer: "string"', CEL_SKIPPED]),
    ("spec.maxSize", 2.5, ['spec.maxSize: Invalid value: "number": spec.maxSize in body must be of type integer: "number"', CEL_SKIPPED]),
    ("spec.replicas", -1, ["spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0"]),
    ("spec.maxRestarts", -1, ["spec.maxRestarts: Invalid value: -1: spec.maxRestarts in body should be greater than or equal to 0"]),
    ("spec.nprocPerNode", 0, ["spec.nprocPerNode: Invalid value: 0: spec.nprocPerNode in body should be greater than or equal to 1"]),
    ("spec.rendezvous", {"backend": "zookeeper"}, ['spec.rendezvous.backend: Unsupported value: "zookeeper": supported values: "embedded", "consul", "etcd"', CEL_SKIPPED]),
    ("spec.checkpoint", {"everySeconds": 0}, ["spec.checkpoint.everySeconds: Invalid value: 0: spec.checkpoint.everySeconds in body should be greater than 0"]),
    ("spec.checkpoint", {"everySteps": 0, "keep": 0}, ["spec.checkpoint.everySteps: Invalid value: 0: spec.checkpoint.everySteps in body should be greater than or equal to 1",
                                                      "spec.checkpoint.keep: Invalid value: 0: spec.checkpoint.keep in body should be greater than or equal to 1"]),
    ("spec.checkpoint", "s3://bucket", ['spec.checkpoint: Invalid value: "string": spec.checkpoint in body must be of type object: "string"', CEL_SKIPPED]),
    ("spec.replicaSpecs.template", {"spec": {"containers": []}}, ["spec.replicaSpecs.template.spec.containers: Invalid value: 0: spec.replicaSpecs.template.spec.containers in body should have at least 1 items"]),
    ("spec.replicaSpecs.template", {"spec": {"containers": [{"name": "x"}]}}, ["spec.replicaSpecs.template.spec.containers[0].image: Required value", CEL_SKIPPED]),
    ("spec.replicaSpecs.template", {"spec": {"containers": [{"name": "x", "image": "i", "command": "python main.py"}]}},
     ['spec.replicaSpecs.template.spec.containers[0].command: Invalid value: "string": spec.replicaSpecs.template.spec.containers[0].command in body must be of type array: "string"', CEL_SKIPPED]),
    ("spec.minsize", 1, ['unknown field "spec.minsize"']),
    ("status.lastCheckpoint", {"time": "yesterday"}, ['status.lastCheckpoint.time: Invalid value: "yesterday": status.lastCheckpoint.time in body must be of type date-time: "yesterday"']),
    ("status.phase", "Done", ['status.phase: Unsupported value: "Done": supported values: "Pending", "Running", "Scaling", "Restarting", "Succeeded", "Failed"', CEL_SKIPPED]),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_SPECS,
                         ids=[f"{p}={'<deleted>' if v is _DELETE else v!r}" for p, v, _ in BAD_SPECS])
def test_bad_spec_is_rejected_with_the_schema_message(validator: CRDValidator, example: dict,
                                                     path: str, value: Any, expected: list[str]) -> None:
    errors = _errors(validator, _mutate(example, path, value))
    assert len(errors) == len(expected), errors
    for got, want in zip(errors, expected, strict=True):
        assert want in got


def test_max_below_min_is_rejected_by_the_cel_rule_alone(crd: dict, example: dict) -> None:
    bad = _mutate(_mutate(example, "spec.minSize", 3), "spec.maxSize", 2)
    assert _errors(CRDValidator(crd), bad) == [MIN_MAX_MESSAGE]
    without_rule = copy.deepcopy(crd)
    spec_schema = without_rule["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    del spec_schema["x-kubernetes-validations"]
    assert _errors(CRDValidator(without_rule), bad) == []  # the schema alone cannot say it


@settings(max_examples=60, deadline=None)
@given(lo=st.integers(1, 10000), hi=st.integers(1, 10000), replicas=st.none() | st.integers(0, 20000))
def test_sizes_accepted_exactly_when_max_at_least_min(validator: CRDValidator, lo: int, hi: int,
                                                      replicas: int | None) -> None:
    (doc,) = load_docs(EXAMPLE)
    doc["spec"].update(minSize=lo, maxSize=hi)
    if replicas is not None:
        doc["spec"]["replicas"] = replicas  # any desired count is accepted: the operator clamps
    assert (_errors(validator, doc) == []) == (hi >= lo)


def test_status_written_by_the_operator_is_accepted(validator: CRDValidator, example: dict) -> None:
    example["status"] = {
        "phase": "Running", "replicas": 3, "readyReplicas": 2, "restarts": 1, "round": 4,
        "observedGeneration": 2, "selector": "exabits.ai/job=example-job",
        "lastCheckpoint": {"step": 1200, "time": "2026-01-01T00:00:00Z", "url": "s3://b/j"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "MinSizeReached",
                        "message": "2 of 3 workers ready", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "kopf": {"progress": {}},
    }
    assert _errors(validator, example) == []


def test_duplicate_condition_types_are_rejected(validator: CRDValidator, example: dict) -> None:
    example["status"] = {"conditions": [{"type": "Ready", "status": "True"},
                                        {"type": "Ready", "status": "False"}]}
    assert _errors(validator, example) == ['status.conditions[1]: Duplicate value: {"type": "Ready"}']


def test_pod_template_fields_beyond_the_checked_subset_pass_through(validator: CRDValidator,
                                                                    example: dict) -> None:
    template = example["spec"]["replicaSpecs"]["template"]
    template["metadata"] = {"labels": {"team": "a"}, "annotations": {"x": "y"}}
    template["spec"]["nodeSelector"] = {"gpu": "h100"}
    template["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": 8}}
    assert _errors(validator, example) == []
    assert validator.prepare(example)["spec"]["replicaSpecs"]["template"] == template


# ----- the CRD and lattice.k8s.spec (used where no API server checks: `lattice local`) agree -----
SPEC_CHECKS = [(p, v) for p, v, _ in BAD_SPECS if p.startswith("spec.") and p != "spec.minsize"]


@pytest.mark.parametrize(("path", "value"), SPEC_CHECKS,
                         ids=[f"{p}={'<deleted>' if v is _DELETE else v!r}" for p, v in SPEC_CHECKS])
def test_parse_job_rejects_what_the_crd_rejects(example: dict, path: str, value: Any) -> None:
    from lattice.core.errors import ConfigError
    from lattice.k8s.spec import parse_job

    with pytest.raises(ConfigError, match=path.split(".")[1]):
        parse_job(_mutate(example, path, value))


def test_parse_job_reads_the_crd_defaults(validator: CRDValidator, example: dict) -> None:
    from lattice.k8s.spec import parse_job

    raw, defaulted = parse_job(example), parse_job(validator.prepare(example))
    assert (raw.max_restarts, raw.nproc_per_node) == (defaulted.max_restarts, defaulted.nproc_per_node)
    (fuller,) = load_docs(DEPLOY / "examples" / "elastic-job.yaml")
    job = parse_job(fuller)
    assert (job.min_size, job.max_size, job.desired, job.nproc_per_node) == (2, 8, 4, 4)
    assert job.selector == "exabits.ai/job=resnet-elastic"
