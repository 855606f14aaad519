"""Units of ``lattice local`` without processes: the TrainingJob -> agent process translation,
the ``get`` table (columns taken from the CRD itself), the observation of local pods and the
rendezvous, and the state-directory operations (apply, scale validation, delete's cleanup)."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import pytest
import yaml

from lattice.core.errors import ConfigError
from lattice.k8s.model import FAILED, RUNNING, SUCCEEDED
from lattice.k8s.spec import parse_job
from lattice.local import fields, jobs, table, translate
from lattice.local.observe import PodRecord, Rendezvous, node_pid, worker
from lattice.local.state import JobDir, write_json

REPO = Path(__file__).resolve().parents[2]
JOB = """
apiVersion: "exabits.ai/v1"
kind: TrainingJob
metadata: {name: example-job, namespace: lattice}
spec:
  minSize: 1
  maxSize: 3
  nprocPerNode: 2
  maxRestarts: 5
  checkpoint: {everySteps: 10, keep: 2}
  replicaSpecs:
    template:
      spec:
        containers:
          - name: trainingjob
            image: exabits/lattice-resnet
            imagePullPolicy: Always
            command: ["python", "-u", "main.py"]
            args: ["--lr", "0.1"]
            resources: {limits: {nvidia.com/gpu: 1}}
            env:
              - {name: DATA, value: /data}
              - {name: SHARDS, value: "$(DATA)/shards $$(DATA)"}
              - {name: ME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
              - {name: TOKEN, valueFrom: {secretKeyRef: {name: s, key: k}}}
          - {name: sidecar, image: busybox}
"""


def settings(tmp_path: Path) -> translate.LocalSettings:
    return translate.LocalSettings("127.0.0.1:4567", str(tmp_path / "ckpt"), str(tmp_path), ttl=3, last_call=1)


def local_spec(tmp_path: Path, text: str = JOB):
    return translate.localize(parse_job(yaml.safe_load(text)), settings(tmp_path))


def test_launch_runs_the_container_command_under_a_local_agent_with_the_jobs_settings(tmp_path: Path) -> None:
    launch = translate.launch(local_spec(tmp_path), 2, settings(tmp_path))
    argv = launch.argv
    assert argv[:4] == [sys.executable, "-m", "lattice.cli", "agent"]
    seg = argv[4:argv.index("--no-python")]
    flags = dict(zip(seg[::2], seg[1::2], strict=True))
    assert flags["--nnodes"] == "1:3" and flags["--nproc-per-node"] == "2" and flags["--max-restarts"] == "5"
    assert flags["--rdzv-endpoint"] == "127.0.0.1:4567" and flags["--rdzv-id"] == "example-job"
    assert flags["--ttl"] == "3" and flags["--last-call"] == "1" and flags["--node-addr"] == "127.0.0.1"
    assert argv[argv.index("--") + 1:] == [sys.executable, "-u", "main.py", "--lr", "0.1"]
    env = launch.env
    assert env["LATTICE_CHECKPOINT_DIR"] == str(tmp_path / "ckpt")
    assert env["LATTICE_EVERY_STEPS"] == "10" and env["LATTICE_KEEP"] == "2"
    assert env["SHARDS"] == "/data/shards $(DATA)"  # Kubernetes' $(VAR) expansion and $$ escape
    assert env["ME"] == env["LATTICE_POD_NAME"] == "example-job-worker-2"
    assert "TOKEN" not in env and env["LATTICE_WORKER_INDEX"] == "2"
    assert launch.cwd == str(tmp_path) and launch.grace == 180


def test_notes_name_what_is_ignored_locally(tmp_path: Path) -> None:
    notes = "\n".join(translate.notes(local_spec(tmp_path)))
    assert "image 'exabits/lattice-resnet' is ignored locally" in notes
    assert "['sidecar'] are ignored" in notes and "resources is ignored" in notes
    assert "env TOKEN: valueFrom ['secretKeyRef']" in notes and "ME" not in notes


def test_a_template_without_command_or_with_a_missing_working_dir_is_refused(tmp_path: Path) -> None:
    no_command = JOB.replace('command: ["python", "-u", "main.py"]', "")
    with pytest.raises(ConfigError, match=r"command is required"):
        translate.launch(local_spec(tmp_path, no_command), 0, settings(tmp_path))
    bad_dir = JOB.replace("imagePullPolicy: Always", "workingDir: nowhere")
    with pytest.raises(ConfigError, match=r"workingDir 'nowhere' is not a directory here"):
        translate.launch(local_spec(tmp_path, bad_dir), 0, settings(tmp_path))


def test_checkpoint_url_is_resolved_from_where_apply_ran() -> None:
    spec = parse_job(yaml.safe_load(JOB.replace("{everySteps: 10, keep: 2}", "{url: ck/run1}")))
    assert translate.checkpoint_dir(spec.checkpoint, Path("/d"), "/work") == "/work/ck/run1"
    assert translate.checkpoint_dir(parse_job(yaml.safe_load(JOB)).checkpoint, Path("/d"), "/w") == "/d"


def test_get_columns_are_the_crds_printer_columns() -> None:
    crd = yaml.safe_load((REPO / "deploy" / "crd" / "trainingjobs.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("served"))
    declared = [(c["name"], c["jsonPath"], c["type"]) for c in version["additionalPrinterColumns"]]
    assert list(table.COLUMNS) == declared


def test_get_prints_kubectl_style_rows() -> None:
    now = datetime.datetime(2025, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
    job = yaml.safe_load(JOB)
    job["metadata"]["creationTimestamp"] = "2025-01-01T11:56:40Z"
    job["status"] = {"phase": "Running", "readyReplicas": 2, "replicas": 3, "restarts": 1}
    fresh = {"metadata": {"name": "b", "namespace": "x", "creationTimestamp": "2025-01-01T11:59:59Z"},
             "spec": {"minSize": 2, "maxSize": 2}}
    lines = table.render([job, fresh], now=now).splitlines()
    assert lines == [
        "NAME          PHASE     READY   DESIRED   MIN   MAX   RESTARTS   AGE",
        "example-job   Running   2       3         1     3     1          3m20s",
        "b                                         2     2                1s",
    ]
    wide = table.render([job], all_namespaces=True, now=now).splitlines()
    assert wide[0].split()[:2] == ["NAMESPACE", "NAME"] and wide[1].split()[:2] == ["lattice", "example-job"]


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-1, "0s"), (-5, "<invalid>"), (119, "119s"), (120, "2m"), (125, "2m5s"), (600, "10m"),
    (3 * 3600 - 1, "179m"), (3 * 3600, "3h"), (3 * 3600 + 60, "3h1m"), (8 * 3600, "8h"), (47 * 3600, "47h"),
    (48 * 3600, "2d"), (50 * 3600, "2d2h"), (8 * 86400, "8d"), (800 * 86400, "2y70d"), (9 * 365 * 86400, "9y"),
])
def test_age_is_written_as_kubectl_writes_it(seconds: int, text: str) -> None:
    assert table.human_age(seconds) == text


def test_observation_maps_processes_and_the_rendezvous_onto_pod_states() -> None:
    state = {"round": 4, "phase": "closed", "ranks": [["vm-a-100-ab12", 0], ["host-200-cd34", 1]]}
    rdzv = Rendezvous.from_entries("j", {"lattice/j/state": json.dumps(state).encode(),
                                         "lattice/j/stop/4": b"{}", "lattice/j/restarts": b"2"})
    assert rdzv.agent_restarts == 2 and node_pid("vm-a-100-ab12") == 100 and node_pid("odd") is None

    def pod(pid: int, code: int | None = None, deleted: float | None = None) -> PodRecord:
        return PodRecord(index=pid // 100, name=f"j-worker-{pid}", pid=pid, started=1, created=0.0,
                         exit_code=code, deleted_at=deleted)

    w = worker(pod(100), rdzv, {4: 50.0}, now=60.0, grace=30)
    assert (w.phase, w.ready, w.round, w.checkpointing, w.mid_checkpoint) == (RUNNING, True, 4, True, True)
    assert not worker(pod(100), rdzv, {4: 50.0}, now=90.0, grace=30).checkpointing  # bounded by the grace
    assert not worker(pod(300), rdzv, {4: 50.0}, now=60.0, grace=30).ready  # not in the round yet
    done, failed = worker(pod(200, 0), rdzv, {}, 60.0, 30), worker(pod(200, -9, 55.0), rdzv, {}, 60.0, 30)
    assert (done.phase, done.ready) == (SUCCEEDED, False)
    assert (failed.phase, failed.message, failed.deleting) == (FAILED, "killed by SIGKILL", True)
    opened = Rendezvous.from_entries("j", {"lattice/j/state": json.dumps({**state, "phase": "open"}).encode()})
    assert not worker(pod(100), opened, {}, 60.0, 30).ready


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LATTICE_LOCAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_apply_stores_the_job_and_scale_validates_against_min_and_max(home: Path, tmp_path: Path) -> None:
    job, outcome, notes = jobs.apply(yaml.safe_load(JOB), str(tmp_path), {"ttl": 5})
    assert outcome == "created" and job.path == home / "lattice" / "example-job" and notes
    stored = job.read_job()
    assert stored["metadata"]["generation"] == 1 and stored["metadata"]["creationTimestamp"].endswith("Z")
    with pytest.raises(ConfigError, match=r"--replicas 4 is outside spec.minSize..spec.maxSize \(1..3\)"):
        jobs.scale(job, 4)
    with pytest.raises(ConfigError, match=r"outside"):
        jobs.scale(job, 0)
    jobs.scale(job, 2)
    assert job.read_job()["spec"]["replicas"] == 2 and job.read_job()["metadata"]["generation"] == 2
    assert jobs.find("example-job", None).path == job.path  # the only job of that name
    with pytest.raises(ConfigError, match=r"has no running controller; delete it first"):
        jobs.apply(yaml.safe_load(JOB), str(tmp_path), {})


def test_bad_jobs_are_refused_before_anything_is_stored(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"spec.maxSize \(1\) must be >= spec.minSize \(2\)"):
        jobs.apply(yaml.safe_load(JOB.replace("minSize: 1", "minSize: 2").replace("maxSize: 3", "maxSize: 1")),
                   str(tmp_path), {})
    (tmp_path / "bad.yaml").write_text("spec: [unclosed")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        jobs.load_manifests(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match=r"cannot read it"):
        jobs.load_manifests(str(tmp_path / "missing.yaml"))
    assert not home.exists() or not any(home.rglob("job.json"))
    with pytest.raises(ConfigError, match=r'trainingjob "nope" not found'):
        jobs.find("nope", None)


def test_delete_removes_the_state_but_keeps_checkpoints_and_logs(home: Path, tmp_path: Path) -> None:
    job, _, _ = jobs.apply(yaml.safe_load(JOB), str(tmp_path), {})
    (job.checkpoints / "step-0000000010").mkdir(parents=True)
    job.logs.mkdir()
    (job.logs / "example-job-worker-0.log").write_text("hi\n")
    write_json(job.pods_file, [PodRecord(0, "example-job-worker-0", 999999, 1, 0.0).to_dict()])  # long gone
    assert jobs.delete(job, timeout=1) == []
    assert not job.exists() and (job.checkpoints / "step-0000000010").is_dir() and job.logs.is_dir()
    jobs.delete(JobDir("lattice", "example-job"), timeout=1, purge=True)
    assert not job.path.exists()


def _declared(schema: dict) -> dict | None:
    """The declared-property tree of a CRD schema node (None: free content)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or "properties" not in schema:
        return None if schema.get("type") == "object" else {}
    return {k: _declared(v) for k, v in schema["properties"].items()}


def test_known_fields_are_the_crds_declared_properties() -> None:
    crd = yaml.safe_load((REPO / "deploy" / "crd" / "trainingjobs.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v.get("served"))["schema"]["openAPIV3Schema"]
    declared = _declared(schema)
    declared["metadata"] = declared["status"] = None  # the API server's; the operator's
    assert declared == fields.KNOWN


def test_a_misspelt_field_is_refused_like_the_cluster_does(home: Path, tmp_path: Path) -> None:
    bad = yaml.safe_load(JOB.replace("minSize: 1", "minSize: 1\n  minsize: 1").replace("keep: 2", "kep: 2"))
    with pytest.raises(ConfigError, match=r'unknown field "spec.minsize" \(known: minSize, maxSize.*'
                                          r'unknown field "spec.checkpoint.kep"'):
        jobs.apply(bad, str(tmp_path), {})
    assert fields.unknown_fields(yaml.safe_load(JOB)) == []  # free content (template spec) is not checked
