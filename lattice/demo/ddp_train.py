"""A small DDP (gloo, CPU) training script for ``lattice run``: the elastic demo's workload.

It works unchanged under torchrun and under ``lattice run``. Each worker prints one line
when it starts (rank, world, pid, round, first step). Rank 0 logs every step to
``$LATTICE_DEMO_LOG`` (JSON lines: step, loss, world, time, round, pid) when set, which
``lattice demo`` turns into its timeline and its plot.

    lattice run --nnodes 1:3 --nproc-per-node 1 -m lattice.demo.ddp_train --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lattice


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="stop after this many optimizer steps")
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--sleep", type=float, default=0.02, help="seconds per step (so a person can watch)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g)
    y = (x[:, :8].sum(dim=1, keepdim=True) > 0).float()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=32, sampler=sampler)
    model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lattice.configure(every_steps=args.every)
    state = lattice.register(model=model, optimizer=opt, epoch=0)
    round_ = int(os.environ.get("LATTICE_ROUND", "0"))
    print(f"rank {rank} of {world}, pid {os.getpid()}, round {round_}: starting at step {state.step}", flush=True)
    if state.restored_from:
        print(f"restored step {state.step} (epoch {state.epoch}) from {state.restored_from}; world {world}", flush=True)
    log = open(os.environ["LATTICE_DEMO_LOG"], "a") if os.environ.get("LATTICE_DEMO_LOG") and rank == 0 else None
    loss_fn = nn.BCEWithLogitsLoss()
    while state.step < args.steps:
        sampler.set_epoch(state.epoch)
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            if log:  # before lattice.step(), which exits here when the agent asked for a planned stop
                log.write(json.dumps({"step": state.step + 1, "loss": loss.item(), "world": world,
                                      "time": time.time(), "round": round_, "pid": os.getpid()}) + "\n")
                log.flush()
            lattice.step()
            if state.step % 50 == 0 and rank == 0:
                print(f"step {state.step} loss {loss.item():.4f} world {world}", flush=True)
            time.sleep(args.sleep)
            if state.step >= args.steps:
                break
        else:
            state.epoch += 1
    lattice.checkpoint()
    lattice.wait()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(f"done at step {state.step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
