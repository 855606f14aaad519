"""A small deterministic CPU training run that uses Lattice: MLP, dropout, shuffled DataLoader,
Adam, StepLR. Used by ``lattice demo`` and the resume tests; a model of how to use the API.

    python -m lattice.demo.train_mlp --checkpoint-dir ckpt --epochs 6 --out final.safetensors
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lattice


def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, object, DataLoader]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched, loader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint-dir", default=os.environ.get("LATTICE_CHECKPOINT_DIR", "ckpt"))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--out", help="write the final weights here (safetensors)")
    p.add_argument("--kill-at", type=int, default=0, help="SIGKILL this process right after step N")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per step (to watch it)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    model, opt, sched, loader = build()
    lattice.configure(checkpoint_dir=args.checkpoint_dir, every_steps=args.every)
    state = lattice.register(model=model, optimizer=opt, scheduler=sched, loader=loader, epoch=0)
    if state.restored_from:
        print(f"[train] restored step {state.step} from {state.restored_from}: epoch {state.epoch}, "
              f"lr {sched.get_last_lr()[0]:g}, data loader at batch "
              f"{loader._lattice_position.batches} of {len(loader)}", flush=True)
    else:
        print("[train] no checkpoint found: starting from scratch", flush=True)

    loss_fn = nn.BCEWithLogitsLoss()
    while state.epoch < args.epochs:
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            lattice.step()
            print(f"[train] step {state.step} epoch {state.epoch} loss {loss.item():.4f}", flush=True)
            if args.kill_at and state.step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.sleep:
                import time

                time.sleep(args.sleep)
        sched.step()
        state.epoch += 1
    lattice.checkpoint()
    lattice.wait()
    if args.out:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"[train] done at step {state.step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
