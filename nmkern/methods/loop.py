"""The one training / evaluation loop the methods share (SR-STE, GaP, 1xN block pruning, the demo).

:func:`train_epochs` runs plain mini-batch steps: ``zero_grad``, ``loss_fn(model(x), y)``,
``backward``, ``before_step()`` (e.g. zero the masked gradients), ``optimizer.step()``,
``scheduler.step()``, ``after_step()`` (e.g. re-zero the masked weights). What makes a
method (SR-STE's gradient term, GaP's masks) lives in its modules or in those hooks, so
the loop itself is method-free. :func:`evaluate` gives a classifier's (loss, accuracy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EpochLosses", "evaluate", "train_epochs"]


@dataclasses.dataclass
class EpochLosses:
    """The training losses of one epoch: ``losses[i]`` of step i, over ``sizes[i]`` examples."""

    losses: list[float] = dataclasses.field(default_factory=list)
    sizes: list[int] = dataclasses.field(default_factory=list)

    @property
    def mean(self) -> float:
        """Mean of the per-step losses (nan for an empty epoch)."""
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    @property
    def per_example(self) -> float:
        """Mean loss per example (steps weighted by their batch size; nan for an empty epoch)."""
        total, count = 0.0, 0
        for loss, size in zip(self.losses, self.sizes):
            total += loss * size
            count += size
        return total / count if count else float("nan")


def _steps_total(batches, epochs: int, steps_per_epoch: int | None) -> int | None:
    if steps_per_epoch is not None:
        return epochs * steps_per_epoch
    return epochs * len(batches) if hasattr(batches, "__len__") else None


def train_epochs(
    model: nn.Module,
    batches: Iterable | Callable[[int], Iterable],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 1,
    loss_fn: Callable = F.cross_entropy,
    scheduler=None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    device: torch.device | str | None = None,
    steps_per_epoch: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[EpochLosses]:
    """Train ``model`` for ``epochs`` passes; returns one :class:`EpochLosses` per epoch.

    ``batches``: ``(inputs, targets)`` pairs, re-iterated every epoch, or a callable
    ``epoch -> batches`` (a fresh order per epoch). ``scheduler`` (optional) is stepped
    after every optimizer step; ``before_step`` runs between ``backward`` and the
    optimizer step, ``after_step`` after the scheduler step. ``device``: move every
    batch there (default: leave them where they are). ``steps_per_epoch`` only sizes
    the progress bar when ``batches`` has no length.
    """
    from tqdm.auto import tqdm

    model.train()
    out: list[EpochLosses] = []
    bar = tqdm(total=_steps_total(batches, epochs, steps_per_epoch), desc=desc, disable=not progress, leave=False)
    try:
        for epoch in range(epochs):
            record = EpochLosses()
            for x, y in (batches(epoch) if callable(batches) else batches):
                if device is not None:
                    x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                if before_step is not None:
                    before_step()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if after_step is not None:
                    after_step()
                record.losses.append(loss.item())
                record.sizes.append(len(y))
                bar.update(1)
            out.append(record)
            bar.set_postfix(loss=f"{record.mean:.4f}")
    finally:
        bar.close()
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, *, device: torch.device | str | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) of a classifier over ``(inputs, targets)`` batches; restores train/eval mode."""
    was = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    try:
        for x, y in batches:
            if device is not None:
                x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("evaluate: batches yielded no example")
    return loss_sum / total, correct / total
