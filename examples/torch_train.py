"""A deterministic PyTorch training run on the CPU that checkpoints with Lattice.

A small MLP with dropout, AdamW, a StepLR scheduler and a shuffled DataLoader are registered
with ``lattice.register``; ``lattice.step()`` checkpoints by policy. Kill it at any point and
run it again (or run it under ``lattice run``, which restarts it): it resumes mid-epoch from the
newest checkpoint and ends with the same weights as an uninterrupted run.

    python examples/torch_train.py --checkpoint-dir ckpt --epochs 4 --out final.pt
    lattice run --checkpoint-dir ckpt examples/torch_train.py --epochs 4 --out final.pt
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lattice


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint-dir", default=os.environ.get("LATTICE_CHECKPOINT_DIR", "ckpt"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per step (to watch it)")
    p.add_argument("--out", help="write the final weights here (torch.save of the state_dict)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)

    lattice.configure(checkpoint_dir=args.checkpoint_dir, every_steps=args.every)
    state = lattice.register(model=model, optimizer=opt, scheduler=sched, loader=loader, epoch=0)
    print(f"[torch_train] pid {os.getpid()}: "
          + (f"restored step {state.step}" if state.restored_from else "fresh start"), flush=True)
    loss_fn = nn.BCEWithLogitsLoss()
    while state.epoch < args.epochs:
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            lattice.step()
            print(f"[torch_train] step {state.step} loss {loss.item():.4f}", flush=True)
            time.sleep(args.sleep)
        sched.step()
        state.epoch += 1
    lattice.checkpoint()
    lattice.wait()
    if args.out:
        torch.save(model.state_dict(), args.out)
    print(f"[torch_train] done at step {state.step}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
