"""Child of test_s3_end_to_end: checkpoint step 1, then stop forever in the middle of step 2's upload."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import lattice
from lattice.core.stores import fsspec_store

url, marker = sys.argv[1], Path(sys.argv[2])
real_put = fsspec_store.FsspecStore.put_file
uploaded: list[str] = []


def put_then_pause(self, step, name, path, size, crc):  # noqa: ANN001
    real_put(self, step, name, path, size, crc)
    if step == 2:
        uploaded.append(name)
        marker.write_text(json.dumps({"uploaded": uploaded}))
        time.sleep(120)  # the test SIGKILLs us here


fsspec_store.FsspecStore.put_file = put_then_pause
s = lattice.new_session(checkpoint_dir=url, every_steps=None)
a = np.zeros(1000)
s.register({"a": a})
s.step_done()
s.checkpoint()
s.wait()
s.step_done()
a += 1
s.checkpoint()
s.wait()
