"""Trains a small deformable CNN for a few steps and saves the weights (rank 0).

Run alone, or under ``torchrun --nproc_per_node=2``: both must end with the same weights.
Usage: python tests/ddp_worker.py OUT.pt
"""

import os
import sys

import torch
import torch.distributed as dist

from deformconv.demo.digits import render_digits
from deformconv.demo.models import deformable_digit_net
from deformconv.demo.training import train


def main(out: str) -> None:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = deformable_digit_net(widths=(8, 16, 16, 16))
    images, labels = render_digits(96, seed=0)
    # SGD: Adam's first steps move every weight by about ±lr whatever the size of its
    # gradient, so a gradient near 0 whose sign the summation order decides (one process
    # sums 16 samples, two sum 8 each) would move a weight by 2·lr between the two runs.
    train(model, images, labels, epochs=2, batch_size=16, lr=0.1, seed=0, progress=False,
          optimizer=torch.optim.SGD)  # fmt: skip
    if not distributed or dist.get_rank() == 0:
        torch.save(model.state_dict(), out)
    if distributed:
        # Every process done before the group goes: a process tearing gloo down while
        # another still uses it aborts ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
