"""Training and evaluation for the demo, in one process or several (``torchrun``).

Under ``torchrun`` (``torch.distributed`` initialised) every process draws the same shuffled
global batches and takes its share of each, and the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`: the gradients are averaged over the
global batch, so the processes end with the weights one process would reach on the same
global batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    parameters: Iterable[nn.Parameter] | list[dict] | None = None,
    device: torch.device | str = "cpu",
    desc: str = "train",
    progress: bool = True,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
) -> list[float]:
    """Train ``model`` with ``optimizer`` (Adam); returns the mean loss of each epoch.

    ``parameters``: what to train (parameters, or parameter groups with their own ``lr``);
    all of the model's by default.  ``batch_size`` is the global batch: it must be
    divisible by the world size.  The progress bar (rank 0) shows this process's running loss
    and training accuracy."""
    rank, size = world()
    if batch_size % size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the world size {size}")
    device = torch.device(device)
    groups = list(model.parameters() if parameters is None else parameters)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    wanted = {id(p) for group in groups for p in group["params"]}
    frozen = {id(p): not p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    network = model
    if size > 1:
        ids = [device.index] if device.type == "cuda" else None
        network = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    step_rule = optimizer(groups, lr=lr)
    steps = len(images) // batch_size
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))
        total, correct, seen = 0.0, 0, 0
        bar = _progress(steps, f"{desc} {epoch + 1}/{epochs}", progress and rank == 0)
        for step in range(steps):
            batch = order[step * batch_size : (step + 1) * batch_size][rank::size]
            x, y = images[batch].to(device), labels[batch].to(device)
            logits = network(x)
            loss = F.cross_entropy(logits, y)
            step_rule.zero_grad(set_to_none=True)
            loss.backward()
            step_rule.step()
            total += loss.item()
            if bar is not None:
                correct += (logits.detach().argmax(1) == y).sum().item()
                seen += len(y)
                bar.set_postfix(loss=f"{total / (step + 1):.3f}", acc=f"{correct / seen:.1%}")
                bar.update()
        if bar is not None:
            bar.close()
        history.append(total / max(1, steps))
    for p in model.parameters():  # give the model back as it came
        p.requires_grad_(not frozen[id(p)])
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 500, device="cpu"
) -> float:
    """Accuracy of ``model`` on ``images``, in [0, 1]."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        correct += (model(x).argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    model.train()
    return correct / max(1, len(images))


def _progress(total: int, desc: str, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)
