"""One rank of a fake data-parallel job (RANK/WORLD_SIZE from the environment, no torch.distributed).

Iterates a DataLoader over 240 indices with an ElasticSampler (global batch 12: per-rank batch 6
with two ranks, resized by the default policy), appends each batch's indices to
<out>/consumed-<round>-<rank>.txt, and after ``steps`` steps (-1: to the end of the epoch)
checkpoints and prints the resizes it saw, the sampler's consumed count and per-rank batch.

Mode ``plain``: the sampler is registered and the loader is built from ``sampler.batch_size``
after ``lattice.register`` (the documented way with an unregistered loader). Mode ``tracked``:
the loader is registered instead (the sampler's state travels with it), has two worker
processes that prefetch, and follows the sampler's batch size by itself.
"""

import json
import os
import sys

from torch.utils.data import DataLoader

import lattice

directory, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "plain"
lattice.configure(checkpoint_dir=directory, every_steps=None)
resizes = []
lattice.on_resize(lambda old, new: resizes.append([old, new]))
world = int(os.environ["WORLD_SIZE"])
if mode == "plain":
    sampler = lattice.ElasticSampler(240, batch_size=12 // world, seed=7)
    lattice.register(sampler=sampler)
    loader = DataLoader(list(range(240)), batch_size=sampler.batch_size, sampler=sampler)
else:
    sampler = lattice.ElasticSampler(240, batch_size=12 // world, seed=7)
    loader = DataLoader(list(range(240)), batch_size=12 // world, sampler=sampler, num_workers=2,
                        prefetch_factor=4)
    lattice.register(loader=loader)
sampler.set_epoch(0)
name = os.path.join(out, f"consumed-{os.environ['LATTICE_ROUND']}-{os.environ['RANK']}.txt")
done = 0
with open(name, "a") as f:
    for batch in loader:
        f.write(" ".join(str(int(i)) for i in batch) + "\n")
        f.flush()
        lattice.step()
        done += 1
        if done == steps:
            break
lattice.checkpoint()
lattice.wait()
print(json.dumps({"resizes": resizes, "consumed": sampler.consumed, "steps": done, "len": len(sampler),
                  "batch": sampler.batch_size}))
