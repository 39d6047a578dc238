"""Run-time helpers shared by training, fine-tuning and prediction: which device runs the
network, seeded random steps that do not disturb the caller's generators, the exception
long work raises when it is cancelled, and Monte-Carlo dropout's mode and result."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .progress import Cancelled  # noqa: F401  (re-exported: where long work raises it)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks cuda > mps > cpu; anything else is passed to torch (and checked)."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was requested but Apple MPS is not available; use --device cpu or auto")
    return device


def describe_device(device: str | torch.device = "auto") -> str:
    """What runs the network, in words: the GPU's name and memory, Apple's GPU, or the CPU
    and its threads."""
    device = resolve_device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GB"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({torch.get_num_threads()} threads)"


@contextmanager
def private_rng(device: torch.device):
    """Fork torch's global generators (CPU and the CUDA device in use) so that seeding
    inside the block does not leak to the caller."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        yield


def reseed(seed: int, step: int) -> None:
    """Seed torch for one step (iteration, slice) of a seeded run: the dropout masks of
    that step depend only on (seed, step), whatever ran before."""
    torch.manual_seed(seed * 1_000_003 + int(step))


def optimiser_step(optimizer, loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> float:
    """One training step of ``optimizer`` (:class:`~PatientFineTuneLib.training_loop.Adam`):
    gradients cleared, back-propagated, applied, through ``scaler`` for float16 mixed
    precision; returns the loss as a number. Base training, fine-tuning
    and U-Net training all take their steps here.

    Raises RuntimeError on a non-finite loss, before the weights change: a diverged run
    stops with a clear message instead of writing a model of NaNs.
    """
    value = loss.item()
    if not np.isfinite(value):
        raise RuntimeError(
            "training diverged (non-finite loss); lower the learning rate, train in fp32, or check the inputs"
        )
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return value


@contextmanager
def mc_dropout_mode(model: nn.Module):
    """Monte-Carlo dropout: Dropout layers sample, everything else (BatchNorm) stays in
    evaluation mode; the previous modes are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


@dataclass
class Uncertainty:
    """Monte-Carlo dropout result (slice-first arrays on the case's grid)."""

    mean: np.ndarray  # mean lesion probability over the samples
    sd: np.ndarray  # per-voxel standard deviation of the lesion probability
    n_samples: int
