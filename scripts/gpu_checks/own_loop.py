"""A plain PyTorch loop under `runner.observe`, for the GPU acceptance's own-loop check:

    python -m scripts.gpu_checks.own_loop RUN_DIR NAME STEPS DEVICE

On CUDA: autocast fp16 with a GradScaler (the user's own, which runner only watches), pinned data through
`obs.dataloader` with 2 workers, non-blocking copies, an evaluation at the end. TensorBoard only.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import runner

LOG_EVERY = 5


def main(run_dir: str, name: str, steps: int, device_name: str) -> int:
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    data = torch.utils.data.TensorDataset(torch.rand(256, 3, 64, 64), torch.randint(0, 10, (256,)))
    step = 0
    with runner.observe(model, optimizer, run_dir=run_dir, name=name, task="classify", steps=steps,
                        log_every=LOG_EVERY, images_every=10, hist_every=10, viz="tensorboard", progress=False) as obs:
        while step < steps and not obs.should_stop:
            for x, y in obs.dataloader(data, batch_size=32, shuffle=True, num_workers=2, pin_memory=cuda):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16 if cuda else torch.bfloat16):
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                obs.step(loss=loss, inputs=x, outputs=out, targets=y)
                step += 1
                if obs.should_stop or step == steps:
                    break
        with torch.no_grad():
            obs.eval({"loss": F.cross_entropy(model(x).float(), y)})
    print(f"loop ended at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
