"""One rank of a fake multi-process job (RANK/WORLD_SIZE from the environment, no torch).

save: draw 5 numbers from this rank's own Python RNG, checkpoint at step 5, print the next draw.
load: restore and print the step, the shared array, the counter and the next draw.
"""

import json
import os
import random
import sys

import numpy as np

import lattice

mode, directory = sys.argv[1], sys.argv[2]
lattice.configure(checkpoint_dir=directory, every_steps=None)
rank = int(os.environ["RANK"])
random.seed(100 + rank)
shared = np.full(4, 7.0) if mode == "save" else np.zeros(4)
state = lattice.register(shared=shared, counter=0)
if mode == "save":
    for _ in range(5):
        random.random()
        lattice.step()
    state.counter = 5
    lattice.checkpoint()
    try:
        lattice.wait()
    except lattice.CheckpointError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(3)
    print(json.dumps({"next": random.random()}))
else:
    print(json.dumps({"step": state.step, "shared": shared.tolist(), "counter": state.counter,
                      "next": random.random()}))
