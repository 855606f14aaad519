"""The public API contract: options and their validation, the environment, the state handle,
checkpoint policies, snapshot isolation, one checkpoint in flight, retention, errors, and
the import boundaries between core, adapters and frameworks."""

from __future__ import annotations

import ast
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import lattice
import lattice.core.persist as persist
from lattice import CheckpointError, ConfigError, StateMismatchError, UnsupportedObjectError

REPO = Path(__file__).resolve().parent.parent
ENV_VARS = ("LATTICE_CHECKPOINT_DIR", "LATTICE_EVERY_STEPS", "LATTICE_EVERY_SECONDS",
            "LATTICE_KEEP", "LATTICE_ON_BUSY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def committed_steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")
                  if p.name[5:].isdigit() and (p / "manifest.json").is_file())


class Gate:
    """Makes persistence wait (deterministically) until ``open()``; counts the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.event = threading.Event()
        self.entered = threading.Event()
        real = persist.write_file

        def slow_write_file(path, parts):  # type: ignore[no-untyped-def]
            self.entered.set()
            assert self.event.wait(20), "test gate never opened"
            return real(path, parts)

        monkeypatch.setattr(persist, "write_file", slow_write_file)

    def open(self) -> None:
        self.event.set()


# -- configure: options and validation -----------------------------------------------------

@pytest.mark.timeout(20)
def test_configure_sets_every_option(tmp_path: Path) -> None:
    cfg = lattice.configure(checkpoint_dir=str(tmp_path / "c"), every_steps=7, every_seconds=2.5,
                            keep=4, on_busy="wait")
    assert (cfg.checkpoint_dir, cfg.every_steps, cfg.every_seconds, cfg.keep, cfg.on_busy) == (
        str(tmp_path / "c"), 7, 2.5, 4, "wait")
    # options accumulate over calls; a later call changes only what it names
    cfg = lattice.configure(keep=2)
    assert (cfg.every_steps, cfg.keep, cfg.on_busy) == (7, 2, "wait")
    state = lattice.register(x=1)
    assert lattice.session().config.keep == 2
    assert state.step == 0
    assert (tmp_path / "c").is_dir()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("option, value, words", [
    ("every_steps", -1, ["every_steps", "-1"]),
    ("keep", 0, ["keep", "0"]),
    ("on_busy", "x", ["on_busy", "'x'"]),
    ("every_seconds", -5, ["every_seconds", "-5"]),
    ("keep", "3", ["keep", "'3'"]),
    ("bogus", 1, ["bogus"]),
])
def test_configure_rejects_bad_options(tmp_path: Path, option: str, value: object, words: list[str]) -> None:
    for call in (lattice.configure, lattice.new_session):
        with pytest.raises(ConfigError) as info:
            call(checkpoint_dir=str(tmp_path), **{option: value})
        for word in words:
            assert word in str(info.value), (call, str(info.value))
    assert isinstance(info.value, ValueError)


@pytest.mark.timeout(20)
def test_bad_checkpoint_dir_is_named(tmp_path: Path) -> None:
    plain_file = tmp_path / "a-file"
    plain_file.write_text("not a directory")
    under_file = plain_file / "ckpt"
    with pytest.raises(ConfigError) as info:
        lattice.new_session(checkpoint_dir=str(under_file))
    assert str(under_file) in str(info.value)
    with pytest.raises(ConfigError) as info:
        lattice.new_session(checkpoint_dir=str(plain_file))
    assert str(plain_file) in str(info.value)
    # the module-level API reports it at the first register
    lattice.configure(checkpoint_dir=str(under_file))
    with pytest.raises(ConfigError) as info:
        lattice.register(x=1)
    assert str(under_file) in str(info.value)


@pytest.mark.timeout(20)
def test_checkpoint_dir_cannot_change_after_register(tmp_path: Path) -> None:
    lattice.configure(checkpoint_dir=str(tmp_path / "a"))
    lattice.register(x=1)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        lattice.configure(checkpoint_dir=str(tmp_path / "b"))
    lattice.configure(every_steps=5)  # policy options may change at any time
    assert lattice.session().config.every_steps == 5


@pytest.mark.timeout(20)
def test_environment_sets_options_and_arguments_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATTICE_CHECKPOINT_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("LATTICE_EVERY_STEPS", "7")
    monkeypatch.setenv("LATTICE_EVERY_SECONDS", "1.5")
    monkeypatch.setenv("LATTICE_KEEP", "4")
    cfg = lattice.configure()
    assert (cfg.checkpoint_dir, cfg.every_steps, cfg.every_seconds, cfg.keep) == (
        str(tmp_path / "env"), 7, 1.5, 4)
    cfg = lattice.configure(every_steps=3, keep=2, every_seconds=None, checkpoint_dir=str(tmp_path / "arg"))
    assert (cfg.checkpoint_dir, cfg.every_steps, cfg.every_seconds, cfg.keep) == (
        str(tmp_path / "arg"), 3, None, 2)
    s = lattice.new_session(keep=9)
    assert (str(s.config.checkpoint_dir), s.config.every_steps, s.config.keep) == (str(tmp_path / "env"), 7, 9)
    s.close()


@pytest.mark.timeout(20)
def test_environment_checkpoint_dir_used_by_module_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATTICE_CHECKPOINT_DIR", str(tmp_path / "env"))
    lattice.register(x=1)
    lattice.checkpoint()
    path = lattice.wait()
    assert path is not None and path.parent == tmp_path / "env"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("var, raw, words", [
    ("LATTICE_KEEP", "zero", ["LATTICE_KEEP", "'zero'"]),
    ("LATTICE_EVERY_STEPS", "-1", ["every_steps", "-1", "environment"]),
    ("LATTICE_EVERY_SECONDS", "soon", ["LATTICE_EVERY_SECONDS", "'soon'"]),
    ("LATTICE_ON_BUSY", "panic", ["on_busy", "'panic'"]),
])
def test_bad_environment_is_named(monkeypatch: pytest.MonkeyPatch, var: str, raw: str, words: list[str]) -> None:
    monkeypatch.setenv(var, raw)
    with pytest.raises(ConfigError) as info:
        lattice.configure()
    for word in words:
        assert word in str(info.value)


@pytest.mark.timeout(20)
def test_environment_turns_step_policy_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATTICE_EVERY_STEPS", "off")
    assert lattice.configure().every_steps is None


# -- the state handle --------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_state_step_fresh_then_restored(tmp_path: Path, make_session) -> None:
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    state = s.register({"w": np.arange(4.0)})
    assert state.step == 0 and state.restored_from is None
    for _ in range(5):
        s.step_done()
    assert state.step == 5
    s.checkpoint()
    s.wait()
    s2 = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    state2 = s2.register({"w": np.zeros(4)})
    assert state2.step == 5
    assert state2.restored_from == str(tmp_path / "step-0000000005")
    np.testing.assert_array_equal(state2.w, np.arange(4.0))
    with pytest.raises(AttributeError, match="step"):
        state2.step = 3  # type: ignore[misc]
    with pytest.raises(AttributeError, match="nothing registered as 'nope'"):
        _ = state2.nope
    with pytest.raises(AttributeError, match="register it first"):
        state2.nope = 1


@pytest.mark.timeout(60)
def test_plain_values_survive_a_restart(tmp_path: Path, run_python) -> None:
    script = f"""
import lattice
lattice.configure(checkpoint_dir={str(tmp_path)!r}, every_steps=None)
state = lattice.register(epoch=0, history=[], name="run", best=None)
print("restored", state.step, state.epoch, state.history, state.name, state.best)
state.epoch += 1
state.history.append(state.epoch * 10)
state.best = 0.5 * state.epoch
lattice.step()
lattice.checkpoint()
lattice.wait()
"""
    first = run_python(script, timeout=30)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "restored 0 0 [] run None"
    second = run_python(script, timeout=30)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "restored 1 1 [10] run 0.5"
    third = run_python(script, timeout=30)
    assert third.stdout.strip() == "restored 2 2 [10, 20] run 1.0", third.stderr


# -- policies ----------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_every_steps_policy(tmp_path: Path, make_session) -> None:
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=3, keep=10, on_busy="wait")
    s.register({"x": np.zeros(3)})
    for _ in range(10):
        s.step_done()
    s.wait()
    assert committed_steps(tmp_path) == [3, 6, 9]


@pytest.mark.timeout(20)
def test_every_seconds_policy(tmp_path: Path, make_session, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(lattice.core.session.time, "monotonic", lambda: now[0])
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None, every_seconds=10, keep=10,
                     on_busy="wait")
    s.register({"x": np.zeros(3)})
    for t in (1, 5, 9.9, 10.5, 12, 20, 21, 22):  # seconds since the session started
        now[0] = 1000.0 + t
        s.step_done()
        s.wait()
    # due at t=10.5 (step 4) and t=21 (step 7, 10.5 s after the previous one)
    assert committed_steps(tmp_path) == [4, 7]


@pytest.mark.timeout(20)
def test_both_policies_and_none(tmp_path: Path, make_session) -> None:
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=0, every_seconds=None)
    s.register({"x": 1})
    for _ in range(20):
        s.step_done()
    assert s.wait() is None
    assert committed_steps(tmp_path) == []


# -- checkpoint(): snapshot isolation and one checkpoint in flight -------------------------

@pytest.mark.timeout(30)
def test_mutation_after_checkpoint_returns_does_not_leak(tmp_path: Path, make_session,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    gate = Gate(monkeypatch)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(2.0)
    arr = np.full((5,), 3.0)
    tensor = torch.full((6,), 4.0)
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"model": model, "arr": arr, "tensor": tensor, "vals": {"lr": 0.1}})
    future = s.checkpoint()
    assert future is not None
    # the persist is stuck in the gate: training goes on and mutates everything in place
    with torch.no_grad():
        model.weight.add_(100)
        model.bias.zero_()
    arr += 7
    arr[0] = -1
    tensor.mul_(-3)
    s.state.vals["lr"] = 99.0
    assert gate.entered.wait(10) and not future.done()
    gate.open()
    path = s.wait(20)
    assert path is not None
    data = load_file(str(path / "data.safetensors"))
    np.testing.assert_array_equal(data["model/weight"], np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(data["model/bias"], np.full(3, 2.0, np.float32))
    np.testing.assert_array_equal(data["arr"], np.full(5, 3.0))
    np.testing.assert_array_equal(data["tensor"], np.full(6, 4.0, np.float32))
    s2 = make_session(checkpoint_dir=str(tmp_path))
    st = s2.register({"model": torch.nn.Linear(4, 3), "arr": np.zeros(5), "tensor": torch.zeros(6),
                      "vals": {}})
    assert st.vals == {"lr": 0.1}


@pytest.mark.timeout(30)
def test_policy_checkpoint_skipped_while_one_persists(tmp_path: Path, make_session, caplog,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=1, on_busy="skip", keep=10)
    s.register({"x": np.zeros(3)})
    with caplog.at_level(logging.INFO, logger="lattice"):
        s.step_done()  # step 1: starts persisting, held in the gate
        assert gate.entered.wait(10) and s.busy()
        s.step_done()  # step 2: skipped
        s.step_done()  # step 3: skipped
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and all(r.levelno == logging.INFO for r in skipped)
    assert "still persisting" in skipped[0].getMessage() and "step 2" in skipped[0].getMessage()
    assert s.skipped == 2
    gate.open()
    s.wait(20)
    assert committed_steps(tmp_path) == [1]
    s.step_done()  # step 4: nothing in flight, so it checkpoints
    s.wait(20)
    assert committed_steps(tmp_path) == [1, 4]


@pytest.mark.timeout(30)
def test_policy_checkpoint_waits_under_on_busy_wait(tmp_path: Path, make_session,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=1, on_busy="wait", keep=10)
    s.register({"x": np.zeros(3)})
    s.step_done()
    assert gate.entered.wait(10)
    second = threading.Thread(target=s.step_done, daemon=True)
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the policy checkpoint should wait for the one in flight"
    assert s.skipped == 0
    gate.open()
    second.join(20)
    assert not second.is_alive()
    s.wait(20)
    assert committed_steps(tmp_path) == [1, 2]


@pytest.mark.timeout(30)
def test_explicit_checkpoint_always_waits(tmp_path: Path, make_session, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None, on_busy="skip", keep=10)
    s.register({"x": np.zeros(3)})
    s.checkpoint()
    assert gate.entered.wait(10)
    results: list[object] = []
    t = threading.Thread(target=lambda: results.append(s.checkpoint()), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive()
    gate.open()
    t.join(20)
    assert results and results[0] is not None
    s.wait(20)
    assert committed_steps(tmp_path) == [0]  # the same step twice: the second replaces the first


# -- retention and the latest pointer ------------------------------------------------------

@pytest.mark.timeout(30)
def test_retention_keeps_newest_and_deletes_only_after_a_newer_commit(
        tmp_path: Path, make_session, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None, keep=2)
    s.register({"x": np.zeros(3)})
    for expect in ([1], [1, 2], [2, 3], [3, 4]):
        s.step_done()
        s.checkpoint()
        s.wait()
        assert committed_steps(tmp_path) == expect
        assert (tmp_path / "latest").read_text() == f"step-{expect[-1]:010d}\n"
    gate = Gate(monkeypatch)
    s.step_done()
    s.checkpoint()
    assert gate.entered.wait(10)
    time.sleep(0.1)
    assert committed_steps(tmp_path) == [3, 4]  # nothing deleted before step 5 is committed
    assert (tmp_path / "latest").read_text() == "step-0000000004\n"
    gate.open()
    s.wait(20)
    assert committed_steps(tmp_path) == [4, 5]
    assert (tmp_path / "latest").read_text() == "step-0000000005\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".trash-" in p.name]


@pytest.mark.timeout(30)
def test_failed_persist_raises_and_commits_nothing(tmp_path: Path, make_session, caplog,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None, keep=1)
    s.register({"x": np.arange(3.0)})
    s.step_done()
    s.checkpoint()
    s.wait()

    def failing_write_file(path, parts):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist, "write_file", failing_write_file)
    s.state.x[:] = 7
    s.step_done()
    s.checkpoint()
    with pytest.raises(CheckpointError, match="No space left on device"):
        s.wait(20)
    assert committed_steps(tmp_path) == [1]  # keep=1, yet the older checkpoint survives
    assert (tmp_path / "latest").read_text() == "step-0000000001\n"
    assert any("failed" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    monkeypatch.undo()
    s2 = make_session(checkpoint_dir=str(tmp_path))
    st = s2.register({"x": np.zeros(3)})
    assert st.step == 1
    np.testing.assert_array_equal(st.x, np.arange(3.0))


# -- errors that name what is wrong --------------------------------------------------------

class Gizmo:
    pass


@pytest.mark.timeout(20)
def test_unknown_object_type_names_type_and_the_fix(tmp_path: Path, make_session) -> None:
    s = make_session(checkpoint_dir=str(tmp_path))
    with pytest.raises(UnsupportedObjectError) as info:
        s.register({"gizmo": Gizmo()})
    msg = str(info.value)
    assert "Gizmo" in msg and "gizmo" in msg
    assert "register_adapter" in msg and "state_dict" in msg and "docs/adapters.md" in msg
    assert isinstance(info.value, TypeError)
    # a container holding an unsupported object is refused at register time too
    s2 = make_session(checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(UnsupportedObjectError, match="vals"):
        s2.register({"vals": {"a": [1, Gizmo()]}})


@pytest.mark.timeout(20)
def test_shape_mismatch_names_item_key_and_both_shapes(tmp_path: Path, make_session) -> None:
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"arrays": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}})
    s.checkpoint()
    s.wait()
    s2 = make_session(checkpoint_dir=str(tmp_path))
    with pytest.raises(StateMismatchError) as info:
        s2.register({"arrays": {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}})
    msg = str(info.value)
    assert "'arrays'" in msg and "'w'" in msg and "[2, 3]" in msg and "[3, 2]" in msg


# -- import contract -----------------------------------------------------------------------

def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module imported by ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _bad(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.timeout(20)
def test_core_imports_no_runtime_adapters_or_frameworks() -> None:
    forbidden = ("lattice.runtime", "lattice.adapters", "lattice.operator", "lattice.demo", "lattice.cli",
                 "kopf", "kubernetes", "torch", "jax", "tensorflow")
    files = sorted((REPO / "lattice" / "core").glob("*.py"))
    assert len(files) > 5
    for path in files:
        assert _bad(_imports(path, "lattice.core"), forbidden) == [], path
    # the resolver really resolves relative imports
    assert "lattice.core.fmt" in _imports(REPO / "lattice" / "core" / "persist.py", "lattice.core")


@pytest.mark.timeout(20)
def test_python_adapter_imports_no_framework_adapter() -> None:
    names = _imports(REPO / "lattice" / "adapters" / "python.py", "lattice.adapters")
    assert _bad(names, ("lattice.adapters.torch", "lattice.adapters.torch_data", "lattice.adapters.jax",
                        "lattice.adapters.tensorflow", "lattice.runtime", "torch", "jax", "tensorflow")) == []


@pytest.mark.timeout(60)
def test_import_lattice_does_not_import_torch(run_python, tmp_path: Path) -> None:
    code = f"""
import sys
import lattice
assert 'torch' not in sys.modules, 'import lattice imported torch'
lattice.adapters()
lattice.configure(checkpoint_dir={str(tmp_path)!r})
lattice.register(x=1)
lattice.checkpoint(); lattice.wait()
assert 'torch' not in sys.modules, 'using lattice without torch imported torch'
print('ok')
"""
    res = run_python(code, timeout=30)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_unsupported_leaf_inside_a_container_is_named_with_its_path(tmp_path: Path) -> None:
    class Gizmo:
        pass

    session = lattice.new_session(checkpoint_dir=str(tmp_path))
    try:
        with pytest.raises(lattice.UnsupportedObjectError, match=r"Gizmo at vals/a/1: .*docs/adapters.md"):
            session.register({"vals": {"a": [1, Gizmo()]}})
    finally:
        session.close()
