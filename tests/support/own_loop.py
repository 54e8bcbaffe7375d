"""A plain PyTorch loop under runner.observe, for the tests: `python own_loop.py NAME STEPS` (0: until Ctrl+C).

Options come from RUNNER_* variables (run dir, viz, Visdom URL, workers); data loading is made slow on
purpose, so that the step waits for data and the input-bound finding is raised."""

import sys
import time

import torch
from torch import nn

import runner


class SlowData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        time.sleep(0.01)
        return torch.rand(3, 16, 16), index % 10


name, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
with runner.observe(model, optimizer, name=name, experiment="t", task="classify", steps=steps, log_every=2,
                    images_every=5, hist_every=5, progress=False) as obs:
    step = 0
    while not obs.should_stop and (steps == 0 or step < steps):
        for x, y in obs.dataloader(SlowData(), batch_size=8, shuffle=True):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            obs.log({"doubled_loss": loss.detach() * 2})  # before step(): counts in this step's log point
            obs.step(loss=loss, inputs=x, outputs=out, targets=y)
            step += 1
            if obs.should_stop or step == steps:
                break
        with obs.evaluating(), torch.no_grad():  # validation: its time apart from the steps'
            obs.eval({"loss": nn.functional.cross_entropy(model(x), y)})
print(f"loop ended at step {step}", flush=True)
