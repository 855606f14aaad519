"""The CRD and the operator's pure core (lattice.k8s) fit together: the status the reconcile
core writes is accepted by the CRD's status schema (nothing the API server would prune or
reject), and the pods and Service it renders for the example jobs are valid Kubernetes objects
(kubernetes-validate, strict) that the CRD's scale selector matches."""

from __future__ import annotations

import time
from typing import Any

import kubernetes_validate
import pytest
from crd_validator import CRDValidator
from deploy_support import DEPLOY, K8S_VERSION, load_docs, yaml_files

pytestmark = pytest.mark.timeout(60)

JOBS = [d for p in yaml_files(DEPLOY / "examples") for d in load_docs(p) if d["kind"] == "TrainingJob"]
CONSUL = ("consul", "http://consul.lattice.svc:8500")


def _ids(docs: list[dict[str, Any]]) -> list[str]:
    return [d["metadata"]["name"] for d in docs]


@pytest.mark.parametrize("job", JOBS, ids=_ids(JOBS))
def test_status_from_the_reconcile_core_fits_the_crd(job: dict[str, Any]) -> None:
    from lattice.k8s.model import Observed
    from lattice.k8s.reconcile import reconcile
    from lattice.k8s.spec import RendezvousSpec, parse_job

    (crd,) = load_docs(DEPLOY / "crd" / "trainingjobs.yaml")
    spec = parse_job(job, RendezvousSpec(*CONSUL))
    plan = reconcile(spec, Observed(), time.time())
    status = plan.status.to_dict()
    validator = CRDValidator(crd)
    assert [str(e) for e in validator.validate({**job, "status": status})] == []
    assert validator.prepare({**job, "status": status})["status"] == status  # nothing pruned
    assert status["replicas"] == spec.desired and status["selector"] == spec.selector


@pytest.mark.parametrize("job", JOBS, ids=_ids(JOBS))
def test_rendered_pods_and_service_are_valid_kubernetes_objects(job: dict[str, Any]) -> None:
    from lattice.k8s import render
    from lattice.k8s.spec import RendezvousSpec, parse_job

    spec = parse_job(job, RendezvousSpec(*CONSUL))
    key, _, value = spec.selector.partition("=")
    for index in range(spec.max_size):
        pod = render.pod(spec, index)
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        assert pod["metadata"]["labels"][key] == value  # the HPA's selector finds every worker
    kubernetes_validate.validate(render.service(spec), K8S_VERSION, strict=True)
