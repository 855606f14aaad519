"""Helpers for the offline checks of deploy/ and docker/: load the kustomization's resources,
walk pod specs inside workload objects, and parse Dockerfiles into instructions.

No kubectl or kustomize binary is available, so ``kustomize_resources`` reads only the plain
``resources:`` list, the one kustomize feature deploy/ uses; any other transformer key in the
kustomization fails loudly rather than being silently ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKER = REPO / "docker"
K8S_VERSION = "1.35.0"  # oldest schema set kubernetes-validate ships; CRD CEL rules are GA since 1.29
_SUPPORTED_KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in ``path``."""
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomize_resources(root: Path = DEPLOY) -> list[Path]:
    """The files ``root/kustomization.yaml`` lists, in order (no nested kustomizations)."""
    (kust,) = load_docs(root / "kustomization.yaml")
    unknown = set(kust) - _SUPPORTED_KUSTOMIZE_KEYS
    if unknown:
        raise NotImplementedError(f"kustomization uses {sorted(unknown)}; this test builder "
                                  "only understands a plain resources list")
    return [root / entry for entry in kust["resources"]]


def kustomize_build(root: Path = DEPLOY) -> list[dict[str, Any]]:
    """What ``kustomize build root`` yields for a resources-only kustomization."""
    return [doc for path in kustomize_resources(root) for doc in load_docs(path)]


def yaml_files(root: Path) -> list[Path]:
    """Every YAML file under ``root``."""
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod spec(s) a workload object runs (Deployment, StatefulSet, Job, Pod)."""
    kind = obj.get("kind")
    if kind == "Pod":
        return [obj["spec"]]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [obj["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Where a pod spec falls short of non-root hardening (Pod Security 'restricted' and more)."""
    problems = []
    psc = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"pod {flag} must not be set")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {sorted(kinds)} not allowed by 'restricted'")
    if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("pod securityContext.seccompProfile.type must be RuntimeDefault")
    for c in pod.get("initContainers", []) + pod["containers"]:
        csc = c.get("securityContext", {})
        name = c["name"]
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot must be true")
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        if not isinstance(uid, int) or uid == 0:
            problems.append(f"{name}: runAsUser must be a non-zero uid (got {uid!r})")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if (csc.get("capabilities") or {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities.drop must be [ALL]")
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem must be true")
        if csc.get("privileged"):
            problems.append(f"{name}: privileged")
    return problems


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its argument text, source line."""

    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form of CMD/ENTRYPOINT/RUN, or None for the shell form."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped, as by BuildKit
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(f"{path}: ends inside a line continuation")
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions split into build stages, each starting with its FROM."""
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        if not result:
            if ins.keyword != "ARG":
                raise ValueError(f"line {ins.line}: {ins.keyword} before the first FROM")
            continue
        result[-1].append(ins)
    return result


def resolve_args(text: str, instructions: list[Instruction]) -> str:
    """Substitute ``${NAME}``/``$NAME`` by the defaults of global ARGs (before the first FROM)."""
    defaults = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.args:
            key, _, value = ins.args.partition("=")
            defaults[key] = value
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)
