"""One rank of a fake data-parallel job (RANK/WORLD_SIZE from the environment, no torch.distributed).

Iterates a DataLoader over 240 indices with an ElasticSampler (per-rank batch 4), appends each
batch's indices to <out>/consumed-<round>-<rank>.txt, and after ``steps`` steps (-1: to the end
of the epoch) checkpoints and prints the resizes it saw and the sampler's consumed count.
"""

import json
import os
import sys

from torch.utils.data import DataLoader

import lattice

directory, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
lattice.configure(checkpoint_dir=directory, every_steps=None)
resizes = []
lattice.on_resize(lambda old, new: resizes.append([old, new]))
sampler = lattice.ElasticSampler(240, batch_size=4, seed=7)
lattice.register(sampler=sampler)
sampler.set_epoch(0)
loader = DataLoader(list(range(240)), batch_size=4, sampler=sampler)
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
print(json.dumps({"resizes": resizes, "consumed": sampler.consumed, "steps": done, "len": len(sampler)}))
