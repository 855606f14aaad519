"""Offline checks of deploy/: every manifest is valid against the Kubernetes schemas
(kubernetes-validate, strict), the kustomization lists exactly the manifests, every pod runs
as non-root with a hardened security context, RBAC grants the operator only what it needs,
and the objects refer to each other consistently (selectors, ports, volumes, commands)."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from crd_validator import CRDValidator
from deploy_support import (
    DEPLOY,
    K8S_VERSION,
    kustomize_build,
    kustomize_resources,
    load_docs,
    pod_specs,
    restricted_violations,
    yaml_files,
)

pytestmark = pytest.mark.timeout(120)

KOPF_COMMAND = ["kopf", "run", "--standalone", "--all-namespaces",
                "--liveness=http://0.0.0.0:8080/healthz", "-m", "lattice_operator"]
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
BUILD = kustomize_build()


def _one(kind: str, name: str) -> dict[str, Any]:
    (obj,) = [d for d in BUILD if d["kind"] == kind and d["metadata"]["name"] == name]
    return obj


def _ids(docs: list[dict[str, Any]]) -> list[str]:
    return [f"{d['kind']}/{d['metadata']['name']}" for d in docs]


# ----- kustomization and schemas -----
def test_kustomization_lists_every_manifest_exactly_once() -> None:
    listed = kustomize_resources()
    assert len(listed) == len(set(listed))
    assert all(p.is_file() for p in listed), [str(p) for p in listed if not p.is_file()]
    on_disk = {p for p in yaml_files(DEPLOY)
               if p.name != "kustomization.yaml" and "examples" not in p.relative_to(DEPLOY).parts}
    assert set(listed) == on_disk


def test_build_holds_the_whole_install() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in BUILD}
    assert kinds >= {("Namespace", "lattice"), ("CustomResourceDefinition", "trainingjobs.exabits.ai"),
                     ("ServiceAccount", "lattice-operator"), ("ClusterRole", "lattice-operator"),
                     ("ClusterRoleBinding", "lattice-operator"), ("Deployment", "lattice-operator"),
                     ("StatefulSet", "consul"), ("Service", "consul-headless"),
                     ("Deployment", "lattice-checkpoint-service"),
                     ("PersistentVolumeClaim", "lattice-checkpoints"),
                     ("Service", "lattice-checkpoint")}
    assert len(kinds) == len(BUILD), "two objects share a kind and name"
    assert not [d for d in BUILD if d["kind"] == "Secret"], "secrets are created by hand, never committed"


@pytest.mark.parametrize("obj", BUILD, ids=_ids(BUILD))
def test_manifest_is_valid_against_the_kubernetes_schema(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_schema_check_catches_a_misspelt_field() -> None:
    bad = copy.deepcopy(_one("Deployment", "lattice-operator"))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolcy"):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", yaml_files(DEPLOY / "examples"), ids=lambda p: p.name)
def test_every_example_is_valid(path: Any) -> None:
    (crd,) = load_docs(DEPLOY / "crd" / "trainingjobs.yaml")
    for doc in load_docs(path):
        if doc["kind"] == "TrainingJob":
            assert [str(e) for e in CRDValidator(crd).validate(doc)] == []
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_namespaced_objects_live_in_the_lattice_namespace() -> None:
    for obj in BUILD:
        want = None if obj["kind"] in CLUSTER_SCOPED else "lattice"
        assert obj["metadata"].get("namespace") == want, _ids([obj])


# ----- pods -----
WORKLOADS = [d for d in BUILD if pod_specs(d)]


@pytest.mark.parametrize("obj", WORKLOADS, ids=_ids(WORKLOADS))
def test_every_pod_runs_non_root_and_hardened(obj: dict[str, Any]) -> None:
    for pod in pod_specs(obj):
        assert restricted_violations(pod) == []
        for c in pod["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            image, _, tag = c["image"].rpartition(":")
            assert image and tag and tag != "latest", c["image"]


def test_hardening_check_reports_a_root_container() -> None:
    pod = copy.deepcopy(pod_specs(_one("Deployment", "lattice-operator"))[0])
    pod["containers"][0]["securityContext"] = {"runAsUser": 0}
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    found = restricted_violations(pod)
    assert "volume host: ['hostPath'] not allowed by 'restricted'" in found
    assert "operator: runAsUser must be a non-zero uid (got 0)" in found
    assert "operator: allowPrivilegeEscalation must be false" in found


@pytest.mark.parametrize("svc", [d for d in BUILD if d["kind"] == "Service"],
                         ids=_ids([d for d in BUILD if d["kind"] == "Service"]))
def test_service_selects_a_workload_and_its_named_ports(svc: dict[str, Any]) -> None:
    selector = svc["spec"]["selector"].items()
    targets = [d for d in WORKLOADS if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(targets) == 1
    ports = {p["name"] for c in pod_specs(targets[0])[0]["containers"] for p in c.get("ports", [])}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def test_workload_selectors_match_their_pod_labels() -> None:
    for obj in WORKLOADS:
        labels = obj["spec"]["template"]["metadata"]["labels"].items()
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels


# ----- RBAC -----
def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


OPERATOR_NEEDS = (
    {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
    | {("", "namespaces", v) for v in ("list", "watch")}
    | {("exabits.ai", "trainingjobs", v) for v in ("get", "list", "watch", "patch")}
    | {("exabits.ai", "trainingjobs/status", v) for v in ("get", "patch")}
    # OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs update on the owner's
    # finalizers, and setting an owner reference needs delete on the object it is set on
    | {("exabits.ai", "trainingjobs/finalizers", "update")}
    | {("", "pods", v) for v in ("create", "delete", "get", "list", "watch", "patch")}
    | {("", "services", v) for v in ("create", "delete", "get", "list", "watch")}
    | {("", "events", v) for v in ("create", "patch")}
)


def test_operator_role_grants_exactly_what_it_needs() -> None:
    role = _one("ClusterRole", "lattice-operator")
    granted = _granted(role)
    assert not [g for g in granted if "*" in g]
    assert granted == OPERATOR_NEEDS, {"extra": granted - OPERATOR_NEEDS, "missing": OPERATOR_NEEDS - granted}


def test_operator_role_is_bound_to_the_operator_pod_identity() -> None:
    binding = _one("ClusterRoleBinding", "lattice-operator")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "lattice-operator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lattice-operator",
                                    "namespace": "lattice"}]
    pod = pod_specs(_one("Deployment", "lattice-operator"))[0]
    assert pod["serviceAccountName"] == "lattice-operator"
    for obj in WORKLOADS:  # the other pods need no API access at all
        if obj["metadata"]["name"] != "lattice-operator":
            assert pod_specs(obj)[0]["automountServiceAccountToken"] is False


# ----- each component -----
def test_operator_deployment_runs_kopf_standalone_with_liveness() -> None:
    dep = _one("Deployment", "lattice-operator")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    (c,) = pod_specs(dep)[0]["containers"]
    assert c["command"] == KOPF_COMMAND
    probe = c["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert (probe["path"], ports[probe["port"]]) == ("/healthz", 8080)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PYTHONPATH"] == "/app/operator"
    consul = _one("Service", "consul")
    assert env["LATTICE_DEFAULT_RDZV_BACKEND"] == "consul"
    assert env["LATTICE_DEFAULT_RDZV_ENDPOINT"] == (
        f"http://{consul['metadata']['name']}.lattice.svc:{consul['spec']['ports'][0]['port']}")


def test_checkpoint_service_command_parses_and_uses_its_volumes() -> None:
    from lattice.cli import parser

    dep = _one("Deployment", "lattice-checkpoint-service")
    pod = pod_specs(dep)[0]
    (c,) = pod["containers"]
    assert c["command"][0] == "lattice"
    args = parser().parse_args(c["command"][1:])
    assert (args.host, args.port) == ("0.0.0.0", 8470)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data = volumes[mounts[str(args.root)]]["persistentVolumeClaim"]["claimName"]
    assert _one("PersistentVolumeClaim", data)
    token_volume = volumes[mounts[str(args.token_file.parent)]]["secret"]
    assert token_volume["secretName"] == "lattice-checkpoint-token"
    assert token_volume["items"] == [{"key": "token", "path": args.token_file.name}]
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # a ReadWriteOnce volume


def test_consul_statefulset_bypasses_the_root_entrypoint_and_keeps_data() -> None:
    sts = _one("StatefulSet", "consul")
    headless = _one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    (c,) = pod_specs(sts)[0]["containers"]
    assert c["image"].startswith("hashicorp/consul:")
    assert c["command"][:2] == ["consul", "agent"]  # not docker-entrypoint.sh (su-exec needs root)
    data_dir = next(a.split("=", 1)[1] for a in c["command"] if a.startswith("-data-dir="))
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounts[data_dir] in claims
    assert f"-bootstrap-expect={sts['spec']['replicas']}" in c["command"]
