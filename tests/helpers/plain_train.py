"""A deterministic CPU training script that knows nothing of Lattice (transparent-mode tests).

    python plain_train.py OUT.safetensors [EPOCHS]

MLP with dropout, a shuffled DataLoader, Adam, StepLR stepped per epoch. ``PLAIN_TRAIN_SLEEP``
(seconds per step) slows it down so a test can kill it mid-run; it does not change results.
"""

import os
import sys
import time

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    out = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    pause = float(os.environ.get("PLAIN_TRAIN_SLEEP", "0"))
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(384, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        for i, (xb, yb) in enumerate(loader):
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            print(f"epoch {epoch} batch {i} loss {loss.item():.4f}", flush=True)
            if pause:
                time.sleep(pause)
        sched.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    print("done", flush=True)


if __name__ == "__main__":
    main()
