"""The one training loop: base training, patient fine-tuning and 3D U-Net training all
iterate here, so cancelling, seeding, mixed precision and the non-finite-loss stop behave
the same in each. What differs between them (how a batch is drawn, what the network
computes, checkpoints and validation) is the caller's ``loss_of`` and ``after_step``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .runtime import Cancelled, optimiser_step, private_rng, reseed

#: "fp32", or "amp": autocast to float16 with loss scaling on CUDA and MPS, to bfloat16
#: (float32's exponent range, no loss scaling needed) on a CPU.
PRECISIONS = ("fp32", "amp")


def check_precision(precision: str, device: torch.device | None = None, channels_last_backward: bool = False) -> None:
    """Raise ValueError for a precision the loop cannot run (on ``device``, when given).

    ``channels_last_backward``: gradients flow back through channels-last convolutions.
    Measured with torch 2.13: the first bfloat16 channels-last backward pass of the dilated
    convolutions on a CPU already gives non-finite weights, so that combination is refused.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device is not None and precision == "amp" and channels_last_backward and torch.device(device).type == "cpu":
        raise ValueError("mixed precision with channels-last is not supported on CPU (non-finite gradients); use one of the two")


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The reduced type of mixed precision on ``device``."""
    return torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16


def training_loop(
    loss_of: Callable[[int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    iterations: range,
    *,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
    rank: int = 0,
    world: int = 1,
    after_step: Callable[[int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    what: str = "training",
) -> list[float]:
    """Run ``optimizer`` over ``iterations``; returns the loss of each.

    Parameters
    ----------
    loss_of : ``loss_of(iteration)`` draws that iteration's batch (from the seed and the
        iteration, never from shared state) and returns the loss tensor; it runs under
        autocast when ``precision`` is "amp".
    iterations : which iterations, e.g. ``range(start, total)`` for a resumed run.
    seed, rank, world : torch's generators are seeded with ``(seed, iteration * world +
        rank)`` before each iteration, inside a fork of the caller's generators, so a
        run's dropout masks depend only on its seed (and a resumed run continues as the
        uninterrupted one would have); the caller's random state is left as it was.
    after_step : called as ``after_step(iteration + 1, loss)`` after each step (progress,
        checkpoints, validation).
    cancel : checked before each iteration; True raises :class:`Cancelled`.

    Raises RuntimeError on a non-finite loss, before the weights change
    (:func:`~PatientFineTuneLib.runtime.optimiser_step`).
    """
    check_precision(precision, device)
    amp = precision == "amp"
    dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type) if amp and dtype == torch.float16 else None
    losses: list[float] = []
    with private_rng(device):
        for iteration in iterations:
            if cancel is not None and cancel():
                raise Cancelled(f"{what} cancelled at iteration {iteration}")
            reseed(seed, iteration * world + rank)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = loss_of(iteration)
            losses.append(optimiser_step(optimizer, loss.float(), scaler))
            if after_step is not None:
                after_step(iteration + 1, losses[-1])
    return losses
