"""The PyTorch adapters: modules (in place), optimizers, LR schedulers, GradScaler, RNG state
and the position of a DataLoader, each checked against an uninterrupted run."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from lattice import StateMismatchError  # noqa: E402

N_ITEMS = 20
BATCH = 3  # 7 batches per epoch, the last one short


def save_then_restore(tmp_path: Path, make_session, old: dict[str, Any], new: dict[str, Any]):
    """Checkpoint ``old`` in one session, restore into ``new`` in another; return the state."""
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register(old)
    s.checkpoint()
    s.wait()
    s2 = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    state = s2.register(new)
    assert state.restored_from is not None
    return state


def bits_equal(a: Any, b: Any) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                     b.view(-1).view(torch.uint8))


# -- modules -----------------------------------------------------------------------------

def bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.timeout(30)
def test_module_params_and_buffers_restored_in_place(tmp_path: Path, make_session) -> None:
    torch.manual_seed(0)
    model = bn_model()
    for _ in range(3):  # moves BatchNorm's running stats and num_batches_tracked
        model(torch.randn(5, 4))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert saved["1.num_batches_tracked"].item() == 3

    torch.manual_seed(1)
    fresh = bn_model()
    params = {name: p for name, p in fresh.named_parameters()}
    ptrs = {k: v.data_ptr() for k, v in fresh.state_dict().items()}
    state = save_then_restore(tmp_path, make_session, {"model": model}, {"model": fresh})
    assert state.model is fresh
    live = fresh.state_dict()
    assert live.keys() == saved.keys()
    for k, v in saved.items():
        assert bits_equal(live[k], v), k
        assert live[k].data_ptr() == ptrs[k], f"{k} was not restored into its own storage"
    for name, p in fresh.named_parameters():
        assert p is params[name]


@pytest.mark.timeout(30)
def test_module_shape_mismatch_names_item_key_and_shapes(tmp_path: Path, make_session) -> None:
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"model": nn.Linear(3, 2)})
    s.checkpoint()
    s.wait()
    s2 = make_session(checkpoint_dir=str(tmp_path))
    with pytest.raises(StateMismatchError) as info:
        s2.register({"model": nn.Linear(4, 2)})
    msg = str(info.value)
    assert "'model'" in msg and "'weight'" in msg and "[2, 3]" in msg and "[2, 4]" in msg


@pytest.mark.timeout(30)
def test_bare_tensor_restored_in_place(tmp_path: Path, make_session) -> None:
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    target = torch.zeros(2, 3, dtype=torch.float64)
    ptr = target.data_ptr()
    state = save_then_restore(tmp_path, make_session, {"t": t}, {"t": target})
    assert state.t is target and target.data_ptr() == ptr
    assert torch.equal(target, t)


# -- optimizers and schedulers: continuing after a restore equals not stopping ------------------

def _batches(n: int) -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt: Any, batches: list, sched: Any = None) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_state_resumes_exactly(tmp_path: Path, make_session, kind: str) -> None:
    make = OPTIMIZERS[kind]
    batches = _batches(8)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = make(model.parameters())
    _train(model, opt, batches[:4])
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"model": model, "optimizer": opt})
    s.checkpoint()
    s.wait()
    _train(model, opt, batches[4:])  # the uninterrupted run

    torch.manual_seed(5)
    model2 = nn.Linear(4, 2)
    opt2 = make(model2.parameters())
    s2 = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s2.register({"model": model2, "optimizer": opt2})
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    _train(model2, opt2, batches[4:])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert bits_equal(a.detach(), b.detach())


SCHEDULERS = {
    "steplr": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[4]),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_lr_scheduler_resumes_exactly(tmp_path: Path, make_session, kind: str) -> None:
    make = SCHEDULERS[kind]

    def setup() -> tuple[Any, Any, Any]:
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, make(opt)

    model, opt, sched = setup()
    for _ in range(6):
        opt.step()
        sched.step()
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"optimizer": opt, "scheduler": sched})
    s.checkpoint()
    s.wait()
    expected = []
    for _ in range(8):
        opt.step()
        sched.step()
        expected.append(sched.get_last_lr())

    _, opt2, sched2 = setup()
    s2 = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s2.register({"optimizer": opt2, "scheduler": sched2})
    got = []
    for _ in range(8):
        opt2.step()
        sched2.step()
        got.append(sched2.get_last_lr())
    assert got == expected


@pytest.mark.timeout(30)
def test_reduce_lr_on_plateau_resumes_exactly(tmp_path: Path, make_session) -> None:
    metrics = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9]

    def setup() -> tuple[Any, Any]:
        opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)

    opt, sched = setup()
    for m in metrics[:5]:
        sched.step(m)
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"optimizer": opt, "scheduler": sched})
    s.checkpoint()
    s.wait()
    saved = dict(sched.state_dict())
    expected = []
    for m in metrics[5:]:
        sched.step(m)
        expected.append(opt.param_groups[0]["lr"])
    assert len(set(expected)) > 1

    opt2, sched2 = setup()
    s2 = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s2.register({"optimizer": opt2, "scheduler": sched2})
    assert sched2.state_dict() == saved
    got = []
    for m in metrics[5:]:
        sched2.step(m)
        got.append(opt2.param_groups[0]["lr"])
    assert got == expected


# -- GradScaler ----------------------------------------------------------------------------

def _cpu_scaler(**kw: Any) -> Any:
    try:
        return torch.amp.GradScaler("cpu", **kw)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') is not available: {exc}")


@pytest.mark.timeout(30)
def test_grad_scaler_state_round_trips(tmp_path: Path, make_session) -> None:
    scaler = _cpu_scaler(init_scale=2.0 ** 10, growth_factor=2.0, backoff_factor=0.25, growth_interval=2)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i, (x, y) in enumerate(_batches(4)):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if i == 2:
            loss = loss * float("inf")  # an overflow: the scale backs off
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    before = scaler.state_dict()
    # 1024 -> 2048 (grown after 2 good steps) -> 512 (backed off on inf), then 1 good step
    assert before["scale"] == 512.0 and before["_growth_tracker"] == 1
    fresh = _cpu_scaler(init_scale=1.0, growth_factor=3.0, backoff_factor=0.5, growth_interval=100)
    state = save_then_restore(tmp_path, make_session, {"scaler": scaler}, {"scaler": fresh})
    assert state.scaler is fresh
    after = fresh.state_dict()
    assert after == before
    assert fresh.get_scale() == scaler.get_scale()


@pytest.mark.timeout(30)
def test_disabled_grad_scaler_round_trips(tmp_path: Path, make_session) -> None:
    scaler = torch.amp.GradScaler("cpu", enabled=False) if hasattr(torch.amp, "GradScaler") else None
    if scaler is None:  # pragma: no cover
        pytest.skip("no torch.amp.GradScaler")
    fresh = torch.amp.GradScaler("cpu", enabled=False)
    state = save_then_restore(tmp_path, make_session, {"scaler": scaler}, {"scaler": fresh})
    assert state.scaler is fresh and fresh.state_dict() == scaler.state_dict()
    s = make_session(checkpoint_dir=str(tmp_path))
    assert s.adapters.resolve(fresh).name == "torch.grad_scaler"


# -- RNG state -----------------------------------------------------------------------------

def _draw() -> tuple[list[float], list[float], list[float]]:
    return (torch.rand(5).tolist(), np.random.rand(5).tolist(), [random.random() for _ in range(5)])


@pytest.mark.timeout(30)
def test_global_rng_states_resume(tmp_path: Path, make_session) -> None:
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    _draw()
    np.random.randn()  # numpy caches a gaussian: has_gauss=1 must survive too
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"x": 1})
    s.checkpoint()
    s.wait()
    expected = _draw() + (np.random.randn(3).tolist(),)

    torch.manual_seed(99)
    np.random.seed(98)
    random.seed(97)
    s2 = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s2.register({"x": 1})
    assert _draw() + (np.random.randn(3).tolist(),) == expected


@pytest.mark.timeout(30)
def test_rng_not_captured_when_disabled(tmp_path: Path, make_session) -> None:
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None, capture_rng=False)
    s.register({"x": 1})
    assert set(s.items) == {"x"}


# -- DataLoader position -------------------------------------------------------------------

class Recording(Dataset):
    """Items are their own indices; remembers which indices it was asked for."""

    def __init__(self, n: int = N_ITEMS):
        self.n, self.asked = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.asked.append(int(i))
        return int(i)


def make_loader(dataset: Dataset | None = None, **kw: Any) -> DataLoader:
    return DataLoader(dataset if dataset is not None else Recording(), batch_size=BATCH, shuffle=True, **kw)


def batches(it: Any) -> list[list[int]]:
    return [b.tolist() for b in it]


def reference(seed: int, **kw: Any) -> tuple[list[list[int]], list[list[int]]]:
    """Two epochs of an uninterrupted run."""
    torch.manual_seed(seed)
    loader = make_loader(**kw)
    return batches(loader), batches(loader)


def _gen_kw(with_generator: bool) -> dict[str, Any]:
    return {"generator": torch.Generator().manual_seed(7)} if with_generator else {}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("consumed", [1, 4, 6])
@pytest.mark.parametrize("with_generator", [False, True], ids=["global_rng", "generator"])
def test_dataloader_resumes_mid_epoch(tmp_path: Path, make_session, consumed: int, with_generator: bool) -> None:
    ref1, ref2 = reference(3, **_gen_kw(with_generator))
    assert len(ref1) == 7 and ref1 != ref2

    torch.manual_seed(3)
    loader = make_loader(**_gen_kw(with_generator))
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"loader": loader})
    it = iter(loader)
    got = [next(it).tolist() for _ in range(consumed)]
    assert got == ref1[:consumed]
    s.checkpoint()
    s.wait()
    del it

    torch.manual_seed(1000)  # the new process starts with other RNG states
    dataset = Recording()
    loader2 = make_loader(dataset, **_gen_kw(with_generator))
    s2 = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s2.register({"loader": loader2})
    assert batches(loader2) == ref1[consumed:]
    assert sorted(dataset.asked) == sorted(i for b in ref1[consumed:] for i in b), "skipped batches were loaded"
    assert batches(loader2) == ref2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_generator", [False, True], ids=["global_rng", "generator"])
def test_dataloader_checkpoint_before_first_epoch(tmp_path: Path, make_session, with_generator: bool) -> None:
    ref1, ref2 = reference(9, **_gen_kw(with_generator))
    torch.manual_seed(9)
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"loader": make_loader(**_gen_kw(with_generator))})
    s.checkpoint()
    s.wait()
    torch.manual_seed(10)
    loader2 = make_loader(**_gen_kw(with_generator))
    make_session(checkpoint_dir=str(tmp_path), every_steps=None).register({"loader": loader2})
    assert batches(loader2) == ref1
    assert batches(loader2) == ref2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_generator", [False, True], ids=["global_rng", "generator"])
def test_dataloader_checkpoint_at_last_batch_vs_after_loop(tmp_path: Path, make_session,
                                                           with_generator: bool) -> None:
    ref1, ref2 = reference(4, **_gen_kw(with_generator))
    torch.manual_seed(4)
    probe = make_loader(**_gen_kw(with_generator))
    ref3 = [batches(probe) for _ in range(3)][2]

    for where in ("last_batch", "after_loop"):
        root = tmp_path / where
        torch.manual_seed(4)
        loader = make_loader(**_gen_kw(with_generator))
        s = make_session(checkpoint_dir=str(root), every_steps=None)
        s.register({"loader": loader, "epoch": 0})
        for i, b in enumerate(loader):
            assert b.tolist() == ref1[i]
            if where == "last_batch" and i == len(loader) - 1:
                s.checkpoint()  # inside the loop, at the epoch's last batch
                s.wait()
        if where == "after_loop":
            s.state.epoch += 1
            s.checkpoint()  # after the loop (and after the epoch bookkeeping)
            s.wait()

        torch.manual_seed(77)
        dataset = Recording()
        loader2 = make_loader(dataset, **_gen_kw(with_generator))
        s2 = make_session(checkpoint_dir=str(root), every_steps=None)
        st = s2.register({"loader": loader2, "epoch": 0})
        if where == "last_batch":
            # the interrupted loop resumes with an empty remainder: code after it runs once
            assert st.epoch == 0
            assert batches(loader2) == []
            assert dataset.asked == []
            st.epoch += 1
        else:
            assert st.epoch == 1
        assert batches(loader2) == ref2, where
        assert batches(loader2) == ref3, where


@pytest.mark.timeout(60)
@pytest.mark.parametrize("consumed", [1, 5])
@pytest.mark.parametrize("with_generator", [False, True], ids=["global_rng", "generator"])
def test_dataloader_with_workers_resumes(tmp_path: Path, make_session, consumed: int,
                                         with_generator: bool) -> None:
    # workers prefetch: the sampler runs ahead of the batches handed out (to its end by batch 3)
    ref1, ref2 = reference(5, num_workers=2, **_gen_kw(with_generator))
    torch.manual_seed(5)
    loader = make_loader(num_workers=2, **_gen_kw(with_generator))
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"loader": loader})
    it = iter(loader)
    assert [next(it).tolist() for _ in range(consumed)] == ref1[:consumed]
    s.checkpoint()
    s.wait()
    del it

    torch.manual_seed(1234)
    loader2 = make_loader(num_workers=2, **_gen_kw(with_generator))
    s2 = make_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s2.register({"loader": loader2})
    assert batches(loader2) == ref1[consumed:]
    assert batches(loader2) == ref2


LOADER_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch.utils.data import DataLoader, Dataset
    import lattice

    class Recording(Dataset):
        def __init__(self):
            self.asked = []
        def __len__(self):
            return 20
        def __getitem__(self, i):
            self.asked.append(int(i))
            return int(i)

    mode, ckpt, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(6 if mode != "resume" else 4242)
    ds = Recording()
    gen = torch.Generator().manual_seed(8)
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=workers, generator=gen)
    out = {}
    if mode == "reference":
        out["epochs"] = [[b.tolist() for b in loader] for _ in range(2)]
        out["next_rand"] = torch.rand(3).tolist()
    else:
        lattice.configure(checkpoint_dir=ckpt, every_steps=None)
        state = lattice.register(loader=loader)
        if mode == "first":
            it = iter(loader)
            out["got"] = [next(it).tolist() for _ in range(2)]
            lattice.checkpoint()
            lattice.wait()
        else:
            out["step"] = state.step
            out["epochs"] = [[b.tolist() for b in loader] for _ in range(2)]
            out["asked"] = ds.asked
            out["next_rand"] = torch.rand(3).tolist()
    print(json.dumps(out))
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [0])  # with workers: test_dataloader_with_workers_resumes
def test_dataloader_resumes_in_a_new_process(tmp_path: Path, run_python, workers: int) -> None:
    script = tmp_path / "loader_job.py"
    script.write_text(LOADER_SCRIPT)
    ckpt = str(tmp_path / "ckpt")

    def run(mode: str) -> dict[str, Any]:
        res = run_python([str(script), mode, ckpt, str(workers)], timeout=60)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    ref = run("reference")
    first = run("first")
    assert first["got"] == ref["epochs"][0][:2]
    resumed = run("resume")
    remainder = ref["epochs"][0][2:]
    assert resumed["epochs"] == [remainder, ref["epochs"][1]]
    if workers == 0:
        # indices of the skipped batches were never asked for
        assert sorted(resumed["asked"]) == sorted(
            [i for b in remainder for i in b] + [i for b in ref["epochs"][1] for i in b])
    assert resumed["next_rand"] == ref["next_rand"]
