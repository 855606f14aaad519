"""A plain DDP training script that never mentions Lattice (gloo on CPU, DistributedSampler).

Each rank appends ``<epoch> <world> <index> <index> ...`` for every batch it trains on to
``<out>/consumed-<rank>-<pid>.txt`` and prints ``epoch E batch K`` after each optimizer step.
Per-rank batch 6 (global batch 12 with two ranks), 720 samples, ``epochs`` epochs.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

out, epochs, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
xs = torch.randn(720, 8)
data = TensorDataset(torch.arange(720), xs, xs.sum(1, keepdim=True))
sampler = DistributedSampler(data, shuffle=True, seed=3)
loader = DataLoader(data, batch_size=6, sampler=sampler)
model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
log = open(os.path.join(out, f"consumed-{rank}-{os.getpid()}.txt"), "a", buffering=1)
for epoch in range(epochs):
    sampler.set_epoch(epoch)
    for k, (idx, x, y) in enumerate(loader):
        log.write(f"{epoch} {world} " + " ".join(str(int(i)) for i in idx) + "\n")
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        print(f"epoch {epoch} batch {k}", flush=True)
        time.sleep(pause)
dist.destroy_process_group()
print("done", flush=True)
