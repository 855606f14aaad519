"""The rendered worker pods and headless Service against expected YAML (tests/operator/golden/),
compared structurally, and against the Kubernetes schemas (kubernetes-validate, offline).

Regenerate after an intended change with ``LATTICE_UPDATE_GOLDEN=1 pytest tests/operator`` and
review the diff.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from lattice.core.errors import ConfigError
from lattice.k8s import RendezvousSpec, parse_job
from lattice.k8s.render import pod, service

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = "1.35.0"
DEFAULT_RDZV = RendezvousSpec("consul", "http://consul.lattice.svc:8500")


def _job(name: str) -> dict:
    obj = yaml.safe_load((REPO / "deploy" / "examples" / name).read_text())
    obj["metadata"].update(uid="0f5c2f3e-1111-4c4c-9d9d-000000000001", generation=1)
    return obj


CASES = {
    "example-job-worker-0.yaml": lambda: pod(parse_job(_job("example-job.yaml"), DEFAULT_RDZV), 0),
    "example-job-service.yaml": lambda: service(parse_job(_job("example-job.yaml"), DEFAULT_RDZV)),
    "resnet-elastic-worker-5.yaml": lambda: pod(parse_job(_job("elastic-job.yaml"), DEFAULT_RDZV), 5),
}


@pytest.mark.parametrize("golden", sorted(CASES))
def test_rendered_object_matches_expected_yaml(golden):
    rendered = CASES[golden]()
    path = GOLDEN / golden
    if os.environ.get("LATTICE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(rendered, sort_keys=False))
    assert rendered == yaml.safe_load(path.read_text())


@pytest.mark.parametrize("golden", sorted(CASES))
def test_rendered_object_is_valid_kubernetes(golden):
    kubernetes_validate.validate(CASES[golden](), K8S_VERSION, strict=True)


def test_agent_wraps_the_training_command_and_reads_settings_from_the_environment():
    obj = pod(parse_job(_job("elastic-job.yaml"), DEFAULT_RDZV), 1)
    (c,) = obj["spec"]["containers"]
    assert c["command"][:2] == ["lattice", "agent"]
    assert c["command"][-6:] == ["--", "python", "-u", "main.py", "--epochs", "90"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LATTICE_MIN_SIZE"] == "2" and env["LATTICE_MAX_SIZE"] == "8"
    assert env["LATTICE_RDZV_ENDPOINT"] == "http://consul.lattice.svc:8500"
    assert env["LATTICE_CHECKPOINT_URL"].startswith("lattice://") and env["LATTICE_EVERY_STEPS"] == "200"
    assert "LATTICE_SERVICE_TOKEN" in env, "the user's own env is kept"
    assert "$(LATTICE_MIN_SIZE):$(LATTICE_MAX_SIZE)" in c["command"]
    for ref in re.findall(r"\$\(([A-Z_]+)\)", " ".join(c["command"])):
        assert ref in env, f"$({ref}) is not defined in the container's env"
    assert obj["spec"]["restartPolicy"] == "Never" and obj["spec"]["subdomain"] == "resnet-elastic"
    assert obj["metadata"]["ownerReferences"][0]["controller"] is True


def test_agent_command_line_parses_with_the_agents_own_flags():
    import argparse

    from lattice.runtime.agent.cli import _add_flags

    obj = pod(parse_job(_job("example-job.yaml"), DEFAULT_RDZV), 0)
    env = {e["name"]: e.get("value", "10.0.0.7") for e in obj["spec"]["containers"][0]["env"]}
    argv = obj["spec"]["containers"][0]["command"][2:]
    for k, v in env.items():  # what the kubelet does with $(VAR)
        argv = [a.replace(f"$({k})", v) for a in argv]
    parser = argparse.ArgumentParser()
    _add_flags(parser)
    args = parser.parse_args(argv)
    assert (args.nnodes, args.rdzv_backend, args.rdzv_id) == ("1:3", "consul", "example-job")
    assert args.no_python and [args.script, *args.args] == ["python", "-u", "main.py"]
    assert args.grace == 150.0 and args.node_addr == "10.0.0.7"


def test_command_is_required_and_long_names_are_rejected():
    job = _job("example-job.yaml")
    del job["spec"]["replicaSpecs"]["template"]["spec"]["containers"][0]["command"]
    with pytest.raises(ConfigError, match=r"containers\[0\]\.command is required"):
        pod(parse_job(job, DEFAULT_RDZV), 0)
    job = _job("example-job.yaml")
    job["metadata"]["name"] = "x" * 60
    with pytest.raises(ConfigError, match="metadata.name"):
        service(parse_job(job, DEFAULT_RDZV))
    job = _job("example-job.yaml")
    job["spec"]["rendezvous"] = {"backend": "embedded"}
    with pytest.raises(ConfigError, match="spec.rendezvous.endpoint"):
        pod(parse_job(job, DEFAULT_RDZV), 0)
