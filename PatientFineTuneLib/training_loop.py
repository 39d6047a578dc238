"""The one training loop: base training, patient fine-tuning and 3D U-Net training all
iterate here, so cancelling, seeding, mixed precision and the non-finite-loss stop behave
the same in each. What differs between them (how a batch is drawn, what the network
computes, checkpoints and validation) is the caller's ``loss_of`` and ``after_step``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import torch

from .runtime import Cancelled, optimiser_step, private_rng, reseed

#: "fp32"; "amp": autocast to float16 with loss scaling on CUDA and MPS, to bfloat16
#: (float32's exponent range, no loss scaling needed) on a CPU; "auto": "amp" where it is
#: the faster of the two for these networks, "fp32" elsewhere (:func:`resolved_precision`).
PRECISIONS = ("fp32", "amp", "auto")


class Adam:
    """Adam (Kingma & Ba) with PyTorch's defaults (betas 0.9 / 0.999, eps 1e-8, no weight
    decay): the same arithmetic as ``torch.optim.Adam``'s single-tensor update, so the same
    weights (bit for bit on a CPU, where torch uses that update).

    Not ``torch.optim.Adam`` itself because the first use of any ``torch.optim`` optimiser
    imports ``torch._dynamo``, which takes seconds in every fine-tuning process the Slicer
    module and the web app start, where the whole fine-tuning should take seconds
    (docs/benchmarks.md has the measurements). It has what the loop and
    ``torch.amp.GradScaler`` use (``param_groups``, ``zero_grad``, ``step``) and a
    ``state_dict`` in ``torch.optim.Adam``'s layout, so checkpoints load in either.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params = list(params)
        # the one place the settings live, as in torch (what GradScaler and schedulers read)
        self.param_groups = [
            {
                "params": self.params,
                "lr": float(lr),
                "betas": (float(betas[0]), float(betas[1])),
                "eps": float(eps),
                "weight_decay": 0.0,
                "amsgrad": False,
            }
        ]
        # per parameter, created at its first step as torch does: steps taken, first and second moments
        self.state: dict[int, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient (others keep their state)."""
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for index, p in enumerate(self.params):
            if p.grad is None:
                continue
            state = self.state.setdefault(
                index, {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            )
            state["step"] += 1
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step = float(state["step"])
            step_size = lr / (1 - beta1**step)
            denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)

    def state_dict(self) -> dict:
        """The state in ``torch.optim.Adam.state_dict()``'s layout."""
        state = {
            i: {"step": torch.tensor(float(s["step"])), "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
            for i, s in self.state.items()
        }
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue from :meth:`state_dict` (or ``torch.optim.Adam``'s) of the same parameters."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimiser state for {sum(len(g['params']) for g in groups)} parameters, not {len(self.params)}"
            )
        self.state = {
            int(i): {
                "step": int(s["step"]),
                "exp_avg": s["exp_avg"].to(self.params[int(i)]).clone(),
                "exp_avg_sq": s["exp_avg_sq"].to(self.params[int(i)]).clone(),
            }
            for i, s in state_dict["state"].items()
        }


def check_precision(precision: str) -> None:
    """Raise ValueError for a precision the loop does not know."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def resolved_precision(precision: str, device) -> str:
    """``precision`` with "auto" decided for ``device``: "amp" on a CPU with AMX tiles,
    "fp32" elsewhere.

    oneDNN's bfloat16 convolutions are fast only where the CPU multiplies bfloat16 in its
    AMX tiles. One training step of the shipped 2D networks (4 patches of 128², every
    layer, channels-last, 2 threads; docs/benchmarks.md): 0.60-0.79x the float32 time
    with AMX, 1.0-1.2x with AVX512-BF16 alone, 2x with AVX-512 and 8-10x with AVX2 (most
    laptops), where bfloat16 is emulated. Not decided for GPUs yet (no GPU measured it):
    float32 there.
    """
    check_precision(precision)
    if precision != "auto":
        return precision
    device = torch.device(device)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return "amp" if device.type == "cpu" and amx() else "fp32"


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The reduced type of mixed precision on ``device``."""
    return torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16


def training_loop(
    loss_of: Callable[[int], torch.Tensor],
    optimizer: Adam,
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
    amp = resolved_precision(precision, device) == "amp"
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
