"""Adapter plugins: an adapter package installed as a wheel (entry-point group
``lattice.adapters``), a broken plugin that is reported without taking the others down, and
adapters registered in code with ``lattice.register_adapter`` (resolution by priority).

The plugin package mirrors the worked example in docs/adapters.md."""

from __future__ import annotations

import base64
import hashlib
import json
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lattice
from lattice import ConfigError, UnsupportedObjectError
from lattice.adapters import BUILTINS

MYPKG = textwrap.dedent('''
    """A tiny adapter plugin: checkpoint ``Point`` objects with Lattice."""
    import numpy as np

    import lattice


    class Point:
        """Not Stateful: no state_dict(); Lattice learns about it from PointAdapter."""

        def __init__(self, x=0.0, y=0.0, label=""):
            self.x, self.y, self.label = x, y, label
            self.velocity = np.zeros(2)  # the last move

        def move(self, dx, dy):
            self.velocity[:] = (dx, dy)
            self.x, self.y = self.x + dx, self.y + dy


    class PointAdapter(lattice.Adapter):
        name = "mypkg.point"   # recorded in every checkpoint; keep it stable
        priority = 100

        def handles(self, obj):
            return isinstance(obj, Point)

        def save(self, obj):
            # plain values and arrays; the array is copied by the snapshot, and on restore
            # read straight into obj.velocity (same shape and dtype)
            return {"x": obj.x, "y": obj.y, "label": obj.label, "velocity": obj.velocity}

        def load(self, obj, tree):
            obj.x, obj.y, obj.label = tree["x"], tree["y"], tree["label"]
            if tree["velocity"] is not obj.velocity:  # a fresh array if it could not go in place
                obj.velocity = tree["velocity"]
            return obj
''')

BROKEN = 'raise ImportError("brokenpkg needs libfoo, which is not installed")\n'


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(out: Path, dist: str, files: dict[str, str], entry_points: dict[str, str]) -> Path:
    """A minimal pure-Python wheel, by hand: the files plus a dist-info with entry points."""
    info = f"{dist}-0.1.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n"
    contents[f"{info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: lattice-tests\nRoot-Is-Purelib: true\n"
                                 "Tag: py3-none-any\n")
    contents[f"{info}/entry_points.txt"] = "[lattice.adapters]\n" + "".join(
        f"{k} = {v}\n" for k, v in entry_points.items())
    record = [_record_line(n, c.encode()) for n, c in contents.items()] + [f"{info}/RECORD,,"]
    contents[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = out / f"{dist}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in contents.items():
            z.writestr(name, text)
    return wheel


@pytest.fixture(scope="module")
def site(tmp_path_factory, run_python) -> Path:
    """A directory with ``mypkg`` (a working adapter) and ``brokenpkg`` (fails to import) installed."""
    root = tmp_path_factory.mktemp("plugins")
    wheels = [
        build_wheel(root, "mypkg", {"mypkg/__init__.py": MYPKG}, {"point": "mypkg:PointAdapter"}),
        build_wheel(root, "brokenpkg", {"brokenpkg/__init__.py": BROKEN}, {"broken": "brokenpkg:Adapter"}),
    ]
    target = root / "site"
    res = run_python(["-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                      "--target", str(target), *map(str, wheels)], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (target / "mypkg" / "__init__.py").is_file()
    assert (target / "mypkg-0.1.dist-info" / "entry_points.txt").is_file()
    return target


SAVE = """
import json, sys, lattice
from mypkg import Point
lattice.configure(checkpoint_dir=sys.argv[1], every_steps=None)
p = Point(1.5, -2.0, "start")
state = lattice.register(point=p, weights=__import__("numpy").arange(3.0))
p.move(0.25, 1.0)
p.move(1.0, 0.5)
p.label = "moved"
lattice.step()
lattice.checkpoint()
lattice.wait()
print(json.dumps([a.name for a in lattice.adapters()]))
"""

RESTORE = """
import json, sys, lattice
from mypkg import Point
lattice.configure(checkpoint_dir=sys.argv[1], every_steps=None)
p = Point()
state = lattice.register(point=p, weights=__import__("numpy").zeros(3))
assert state.point is p
print(json.dumps({"step": state.step, "x": p.x, "y": p.y, "label": p.label,
                  "velocity": p.velocity.tolist(), "weights": state.weights.tolist()}))
"""


@pytest.mark.timeout(90)
def test_plugin_adapter_saves_and_restores_across_processes(site: Path, tmp_path: Path, run_python) -> None:
    env = {"PYTHONPATH": str(site)}
    ckpt = str(tmp_path / "ckpt")
    saved = run_python(["-c", SAVE, ckpt], env=env, timeout=60)
    assert saved.returncode == 0, saved.stderr
    names = json.loads(saved.stdout.strip().splitlines()[-1])
    assert "mypkg.point" in names and "python.value" in names and "stateful" in names
    assert names.index("mypkg.point") < names.index("stateful")  # priority 100 is asked first

    restored = run_python(["-c", RESTORE, ckpt], env=env, timeout=60)
    assert restored.returncode == 0, restored.stderr
    got = json.loads(restored.stdout.strip().splitlines()[-1])
    assert got == {"step": 1, "x": 2.75, "y": -0.5, "label": "moved",
                   "velocity": [1.0, 0.5], "weights": [0.0, 1.0, 2.0]}

    shown = run_python(["-m", "lattice.cli", "ckpt", "inspect", ckpt, "--json"], timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["items"]["point"]["adapter"] == "mypkg.point"
    text = run_python(["-m", "lattice.cli", "ckpt", "inspect", ckpt], timeout=60)
    assert any(ln.split()[:3] == ["point", "adapter", "mypkg.point"] for ln in text.stdout.splitlines())


BROKEN_CHECK = """
import json, sys, warnings
import numpy as np
import lattice
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    errors = lattice.adapter_errors()
from mypkg import Point
lattice.configure(checkpoint_dir=sys.argv[1], every_steps=None)
state = lattice.register(point=Point(3.0, 4.0), arr=np.ones(2), n=5)
lattice.checkpoint()
print(json.dumps({"errors": errors, "names": [a.name for a in lattice.adapters()],
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                  "committed": str(lattice.wait())}))
"""


@pytest.mark.timeout(90)
def test_broken_plugin_is_reported_and_others_still_work(site: Path, tmp_path: Path, run_python) -> None:
    res = run_python(["-c", BROKEN_CHECK, str(tmp_path / "ckpt")], env={"PYTHONPATH": str(site)}, timeout=60)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(doc["errors"]) == 1
    err = doc["errors"][0]
    assert "'broken'" in err and "brokenpkg:Adapter" in err
    assert "ImportError" in err and "libfoo" in err
    assert any("broken" in w and "libfoo" in w for w in doc["warnings"])
    assert "libfoo" in res.stderr  # logged as well
    assert {"mypkg.point", "python.value", "stateful", "python.rng"} <= set(doc["names"])
    assert doc["committed"].endswith("step-0000000000")


@pytest.mark.timeout(60)
def test_no_plugins_no_errors(run_python) -> None:
    res = run_python("import lattice; print(lattice.adapter_errors())", timeout=30)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


# -- adapters registered in code -----------------------------------------------------------

class Celsius:
    """Not Stateful: a temperature with a history."""

    def __init__(self, degrees: float = 0.0):
        self.degrees = degrees
        self.readings = np.zeros(3)


@lattice.register_adapter
class CelsiusAdapter(lattice.Adapter):
    name = "tests.celsius"
    priority = 60

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, Celsius)

    def save(self, obj: Any) -> Any:
        return {"degrees": obj.degrees, "readings": obj.readings}

    def load(self, obj: Any, tree: Any) -> Any:
        obj.degrees = tree["degrees"]
        assert tree["readings"] is obj.readings  # matching arrays are read into the object's own
        return obj


@pytest.mark.timeout(30)
def test_register_adapter_in_code(tmp_path: Path, make_session) -> None:
    assert "tests.celsius" in [a.name for a in lattice.adapters()]
    c = Celsius(21.5)
    c.readings[:] = [20.0, 21.0, 21.5]
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"temp": c})
    assert s.items["temp"].adapter.name == "tests.celsius"
    s.checkpoint()
    s.wait()
    fresh = Celsius()
    s2 = make_session(checkpoint_dir=str(tmp_path))
    st = s2.register({"temp": fresh})
    assert st.temp is fresh and fresh.degrees == 21.5
    np.testing.assert_array_equal(fresh.readings, [20.0, 21.0, 21.5])
    manifest = json.loads((tmp_path / "step-0000000000" / "manifest.json").read_text())
    assert manifest["items"]["temp"]["adapter"] == "tests.celsius"


class Thermostat:
    """Stateful, so the built-in ``stateful`` adapter (priority 10) would handle it."""

    def __init__(self) -> None:
        self.target = 20.0

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.target = sd["target"]


def _adapter(name: str, priority: int) -> Any:
    class A(lattice.Adapter):
        def handles(self, obj: Any) -> bool:
            return isinstance(obj, Thermostat)

        def save(self, obj: Any) -> Any:
            return {"t": obj.target}

        def load(self, obj: Any, tree: Any) -> Any:
            obj.target = tree["t"]
            return obj

    A.name, A.priority = name, priority
    return A()


@pytest.mark.timeout(30)
def test_register_adapter_overrides_by_priority(tmp_path: Path) -> None:
    registry = lattice.AdapterRegistry(BUILTINS)  # a private registry: the override stays local
    assert registry.resolve(Thermostat()).name == "stateful"
    registry.register(_adapter("tests.low", 5))
    assert registry.resolve(Thermostat()).name == "stateful"  # lower priority: asked later
    registry.register(_adapter("tests.high", 50))
    assert registry.resolve(Thermostat()).name == "tests.high"
    registry.register(_adapter("tests.same", 50))
    assert registry.resolve(Thermostat()).name == "tests.same"  # equal priority: the newest first
    registry.register(_adapter("tests.high", 50), replace=True)
    assert registry.resolve(Thermostat()).name == "tests.high"  # re-registered: newest again
    with pytest.raises(ConfigError, match="tests.same"):
        registry.register(_adapter("tests.same", 70))  # a taken name needs replace=True
    with pytest.raises(TypeError, match="not an adapter"):
        registry.register(object())

    # the process-wide registry behind lattice.register_adapter works the same way
    override = _adapter("tests.thermostat", 40)
    assert lattice.register_adapter(override, replace=True) is override
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    try:
        s.register({"thermo": Thermostat()})
        assert s.items["thermo"].adapter is override
    finally:
        s.close()


@pytest.mark.timeout(30)
def test_checkpoint_of_missing_adapter_is_explained(tmp_path: Path, make_session) -> None:
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"temp": Celsius(1.0)})
    s.checkpoint()
    s.wait()
    tree = json.loads((tmp_path / "step-0000000000" / "tree.json").read_text())
    assert tree["items"]["temp"]["adapter"] == "tests.celsius"
    with pytest.raises(UnsupportedObjectError, match="tests.nothing-like-this"):
        lattice.ADAPTERS.by_name("tests.nothing-like-this")
