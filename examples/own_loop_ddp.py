"""The same own loop under torchrun: DDP with gloo on CPU (NCCL on GPUs), rank 0 writes the dashboards,
every rank's memory and step time reach them.

    torchrun --standalone --nproc_per_node=2 examples/own_loop_ddp.py [STEPS]
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.distributed import DistributedSampler

import runner

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100
cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.rand(512, 3, 16, 16), torch.randint(0, 10, (512,)))
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).to(device)
model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()

with runner.observe(model, optimizer, name="own-loop-ddp", task="classify", steps=steps) as obs:
    sampler = DistributedSampler(data, drop_last=True)
    loader = obs.dataloader(data, batch_size=32, sampler=sampler)
    step, epoch = 0, 0
    while step < steps and not obs.should_stop:  # under DDP every rank stops after the same step
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            obs.step(loss=loss, inputs=x, outputs=out, targets=y)
            step += 1
            if step == steps or obs.should_stop:
                break
        epoch += 1
dist.destroy_process_group()
