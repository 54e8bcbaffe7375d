"""A plain PyTorch loop with runner's dashboards, memory, time breakdown and findings: three added lines.

    python examples/own_loop.py [STEPS]
    RUNNER_VIZ=both RUNNER_RUN_DIR=/tmp/runs python examples/own_loop.py 200

Every `runner train` observability option works as a keyword of runner.observe or as its RUNNER_*
variable; the run lands in runs/<name>/ (`runner report own-loop`, `runner diff A B`).
"""

import sys

import torch
from torch import nn

import runner

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100
torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.rand(512, 3, 16, 16), torch.randint(0, 10, (512,)))
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()

with runner.observe(model, optimizer, name="own-loop", task="classify", steps=steps) as obs:
    loader = obs.dataloader(data, batch_size=32, shuffle=True)  # workers ignore Ctrl+C, die with us
    step = 0
    while step < steps and not obs.should_stop:  # the first Ctrl+C ends the loop cleanly
        for x, y in loader:
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            obs.log({"out_abs_mean": out.detach().abs().mean()})  # your own scalars (tensors: no sync)
            obs.step(loss=loss, inputs=x, outputs=out, targets=y)
            step += 1
            if step == steps or obs.should_stop:
                break
        with obs.evaluating(), torch.no_grad():  # validation: its time apart from the steps'
            obs.eval({"loss": loss_fn(model(x), y)})  # validation values: val/<name>
