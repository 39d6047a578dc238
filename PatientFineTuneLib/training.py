"""Base-model training (Jansen et al. 2020): weighted cross-entropy (1, 5), Adam 1e-4, batch 4,
25 overlapping 128x128 patches per lesion slice inside the organ, online rotation in
[-45, 45] degrees.

Reproducibility: every random draw of iteration ``i`` (which patches, which angles, the
dropout masks) comes from generators seeded with ``(seed, i, rank)``. A run therefore
depends only on its inputs and seed, and a run resumed from a checkpoint continues exactly
as the uninterrupted run would have.

Scaling out: under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_distributed` joins the
process group and :func:`train_base_model` wraps the network in DistributedDataParallel.
Each process trains on its own shard of the cases (the caller passes ``cases[rank::world]``,
as a distributed sampler would) and draws its own batch of ``batch_size`` patches, so the
global batch is ``world * batch_size``; gradients are averaged across processes, and only
rank 0 logs, validates and writes checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .arrays import resample_array, resampled_shape
from .model import LesionNet
from .modelfile import ModelBundle, write_torch_file
from .patches import extract_patches, random_patch_centres
from .runtime import Cancelled, resolve_device
from .training_loop import Adam, check_precision, training_loop

if TYPE_CHECKING:
    from .images import Case

CHECKPOINT_FORMAT = "PatientFineTune-checkpoint"


@dataclass
class PatchTrainingConfig:
    """What base training and fine-tuning share (the paper uses the same loss, optimiser,
    learning rate, batch, patch size and rotation range for both)."""

    iterations: int = 10_000
    batch_size: int = 4
    learning_rate: float = 1e-4
    class_weights: tuple[float, float] = (1.0, 5.0)
    patch_size: int = 128
    max_rotation_deg: float = 45.0
    seed: int = 0
    #: "fp32", "amp" (mixed precision) or "auto" (see :data:`~PatientFineTuneLib.training_loop.PRECISIONS`).
    precision: str = "fp32"

    def __post_init__(self):
        check_precision(self.precision)


@dataclass
class TrainingConfig(PatchTrainingConfig):
    """Hyper-parameters of base training; defaults are the paper's."""

    patches_per_slice: int = 25
    #: Run the network on channels-last tensors (helps convolutions on recent GPUs).
    channels_last: bool = False
    #: Share of each batch's patches drawn from anatomy synthesis when real cases train
    #: too (with synthesis alone every patch is synthetic).
    synthetic_fraction: float = 0.0
    #: Probability that a patch's ``droppable_channels`` are blanked (zero, the normalised
    #: median), so the model also segments scans without those sequences (e.g. FLAIR
    #: without T1, the commonest MS follow-up).
    sequence_dropout: float = 0.0
    droppable_channels: tuple[int, ...] = ()
    #: Decay ``d`` of an exponential moving average of the weights (avg <- d * avg +
    #: (1 - d) * weights after every step; 0 keeps none). Validation scores the average and
    #: the run's model is the average: a model taken at one iteration moves by more between
    #: validations than recipes differ (docs/base-training.md), an average of the last
    #: ~1 / (1 - d) steps much less.
    weight_average_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.synthetic_fraction <= 1.0 or not 0.0 <= self.sequence_dropout <= 1.0:
            raise ValueError("synthetic_fraction and sequence_dropout are probabilities between 0 and 1")
        if not 0.0 <= self.weight_average_decay < 1.0:
            raise ValueError("weight_average_decay must be between 0 and 1 (0: no average; 1 would never move)")

    def identity(self) -> dict:
        """Settings a resumed run must share with the run that wrote the checkpoint."""
        d = dataclasses.asdict(self)
        d.pop("iterations")
        if not d["weight_average_decay"]:  # as checkpoints written before the setting existed, so they resume
            d.pop("weight_average_decay")
        d["class_weights"] = list(d["class_weights"])
        d["droppable_channels"] = list(d["droppable_channels"])
        return d


@dataclass
class PatchPool:
    """Training slices at the model's spacing, with fixed patch centres per slice."""

    images: list[torch.Tensor]  # (C, H, W)
    labels: list[torch.Tensor]  # (1, H, W) float 0/1
    centres: list[np.ndarray]  # (patches_per_slice, 2)

    def __len__(self) -> int:
        return len(self.images)


def case_training_slices(case: Case, training_spacing: Sequence[float]) -> list[tuple[torch.Tensor, ...]]:
    """The lesion-containing slices of a normalised case that base training draws patches
    from, resampled in-plane to ``training_spacing``: (image (C, H, W), lesion (H, W), organ
    (H, W)) float tensors, slices without organ left out."""
    if case.lesions is None:
        raise ValueError(f"case {case.name or '?'} has no lesion mask; base training needs one")
    size = resampled_shape(case.images.shape[-2:], case.spacing, training_spacing)
    slices = []
    for s in case.lesion_slices():
        image = resample_array(case.slice_tensor(s)[None], size)[0]
        masks = torch.from_numpy(np.stack([case.lesions[s], case.organ[s]]).astype(np.float32))[None]
        label, organ = resample_array(masks, size, label=True)[0]
        if organ.any():
            slices.append((image, label, organ))
    return slices


def pool_of_slices(slices: Sequence[tuple[torch.Tensor, ...]], patches_per_slice: int, seed: int) -> PatchPool:
    """A :class:`PatchPool` of :func:`case_training_slices`' slices, each with
    ``patches_per_slice`` random centres inside its organ."""
    if not slices:
        raise ValueError("no lesion-containing organ slices in the training cases; nothing to train on")
    rng = np.random.default_rng([seed, 0x9A7C4])
    pool = PatchPool([], [], [])
    for image, label, organ in slices:
        pool.images.append(image)
        pool.labels.append(label[None])
        pool.centres.append(random_patch_centres(organ.numpy() > 0, patches_per_slice, rng))
    return pool


def build_patch_pool(
    cases: Sequence[Case], training_spacing: Sequence[float], patches_per_slice: int, seed: int
) -> PatchPool:
    """Lesion-containing slices of normalised cases, resampled in-plane to
    ``training_spacing``, each with ``patches_per_slice`` centres inside the organ."""
    slices = [s for case in cases for s in case_training_slices(case, training_spacing)]
    return pool_of_slices(slices, patches_per_slice, seed)


def sample_batch(
    pool: PatchPool, config: TrainingConfig, iteration: int, rank: int = 0, n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mini-batch of ``iteration`` (on process ``rank``): random (slice, patch) pairs,
    random rotations; ``n`` patches (default: the batch size)."""
    rng = np.random.default_rng([config.seed, iteration, rank])
    xs, ys = [], []
    for _ in range(config.batch_size if n is None else n):
        k = int(rng.integers(len(pool)))
        centre = pool.centres[k][int(rng.integers(len(pool.centres[k])))]
        angle = rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)
        xs.append(extract_patches(pool.images[k], centre, [angle], config.patch_size))
        ys.append(extract_patches(pool.labels[k], centre, [angle], config.patch_size, label=True))
    return torch.cat(xs), torch.cat(ys)[:, 0].round().long()


def draw_batch(
    pool: PatchPool | None, synthetic, config: TrainingConfig, iteration: int, rank: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mini-batch of ``iteration``: real patches from ``pool``, synthetic ones from
    ``synthetic`` (an :class:`~PatientFineTuneLib.synth.anatomy_patches.AnatomyPatches`), in
    the config's proportion, then the config's sequence dropout. Without synthesis and
    dropout it is exactly :func:`sample_batch`."""
    if synthetic is None:
        x, y = sample_batch(pool, config, iteration, rank)
    else:
        rng = np.random.default_rng([config.seed, iteration, rank, 0x313])
        n_synthetic = (
            config.batch_size if pool is None else int(rng.binomial(config.batch_size, config.synthetic_fraction))
        )
        parts = []
        if n_synthetic < config.batch_size:
            parts.append(sample_batch(pool, config, iteration, rank, n=config.batch_size - n_synthetic))
        if n_synthetic:
            parts.append(synthetic.patches(n_synthetic, config.patch_size, config.max_rotation_deg, iteration, rank))
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if config.sequence_dropout > 0 and config.droppable_channels:
        rng = np.random.default_rng([config.seed, iteration, rank, 0xD0])
        dropped = rng.random(len(x)) < config.sequence_dropout
        if dropped.any():
            x = x.clone()
            x[np.flatnonzero(dropped)[:, None], list(config.droppable_channels)] = 0.0
    return x, y


class BatchStream(torch.utils.data.IterableDataset):
    """The batches of iterations ``start`` to ``config.iterations`` as ``(iteration, x, y)``,
    in order, drawn by :func:`draw_batch` in DataLoader worker processes.

    Worker ``k`` of ``n`` draws the chunks ``k, k + n, ...`` of ``chunk`` consecutive
    iterations, consecutive so that the synthetic volumes a chunk's batches share are
    made once per worker; the DataLoader takes one chunk from each worker in turn, which
    is their order. A batch depends only on its iteration, so the stream is exactly the
    batches the training loop would draw itself.
    """

    def __init__(self, pool, synthetic, config: TrainingConfig, start: int, rank: int = 0, chunk: int = 64):
        self.pool, self.synthetic, self.config = pool, synthetic, config
        self.start, self.rank, self.chunk = int(start), int(rank), int(chunk)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        first = self.start // self.chunk
        for c in range(first + worker, -(-self.config.iterations // self.chunk), workers):
            iterations = range(max(self.start, c * self.chunk), min((c + 1) * self.chunk, self.config.iterations))
            yield [(i, *draw_batch(self.pool, self.synthetic, self.config, i, self.rank)) for i in iterations]


def prefetched_batches(pool, synthetic, config: TrainingConfig, start: int, rank: int, workers: int):
    """An iterator over :class:`BatchStream`'s batches, one at a time, drawn ahead by
    ``workers`` processes (base training on a GPU outruns one CPU core's synthesis)."""
    loader = torch.utils.data.DataLoader(
        BatchStream(pool, synthetic, config, start, rank), batch_size=None, num_workers=workers, prefetch_factor=2
    )
    return (batch for chunk in loader for batch in chunk)


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str | torch.device = "auto") -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment and return
    this process's device; without ``torchrun`` (``WORLD_SIZE`` unset or 1) just resolve
    ``device``. NCCL with one GPU per process (``cuda:LOCAL_RANK``) when the device is CUDA,
    gloo otherwise (CPU processes, e.g. to test on a laptop)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return resolve_device(device)
    device = resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def patch_loss(
    network: torch.nn.Module,
    pool: PatchPool | None,
    config: TrainingConfig,
    device: torch.device,
    rank: int = 0,
    synthetic=None,
    batches=None,
) -> Callable[[int], torch.Tensor]:
    """The loss of base training's iteration ``i`` as a function of ``i``: weighted
    cross-entropy of ``network`` on :func:`draw_batch`'s patches (taken from ``batches``,
    an iterator of :func:`prefetched_batches`, when given). Shared with the
    throughput benchmark, so what it times is what training runs. ``network`` may be a
    DistributedDataParallel wrapper; it is put in the config's memory format here (a
    network loaded for inference is channels-last already)."""
    weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    network.to(memory_format=memory_format)

    def loss_of(iteration: int) -> torch.Tensor:
        if batches is None:
            x, y = draw_batch(pool, synthetic, config, iteration, rank)
        else:
            drawn, x, y = next(batches)
            if drawn != iteration:
                raise RuntimeError(f"prefetched batch of iteration {drawn} arrived for iteration {iteration}")
        logits = network(x.to(device, memory_format=memory_format))
        return F.cross_entropy(logits.float(), y.to(device), weight=weights)

    return loss_of


def update_weight_average(averaged: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``averaged`` <- ``decay`` * ``averaged`` + (1 - ``decay``) * ``model``, in place, for
    every floating-point weight and buffer (BatchNorm's running statistics too, so the
    average is a network whose statistics match its weights); counters are copied."""
    with torch.no_grad():
        for mean, now in zip(averaged.state_dict().values(), model.state_dict().values()):
            if mean.is_floating_point():
                mean.lerp_(now, 1.0 - decay)
            else:
                mean.copy_(now)


def checkpoint_weights(payload: dict) -> dict:
    """The weights a training checkpoint stands for: its weight average where the run kept
    one (what it validates and exports), else its model."""
    return payload.get("averaged_model") or payload["model"]


def _save_checkpoint(path: Path, model, optimizer, iteration: int, config: TrainingConfig, averaged=None) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "iteration": iteration,
        "config_json": json.dumps(config.identity(), sort_keys=True),
        "architecture_json": json.dumps(model.architecture(), sort_keys=True),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    if averaged is not None:
        payload["averaged_model"] = {k: v.detach().cpu() for k, v in averaged.state_dict().items()}
    write_torch_file(payload, path, overwrite=True)


def checkpoint_setting_differences(payload: dict, config: TrainingConfig, model) -> list[str]:
    """The settings in which a checkpoint's run differs from ``config`` and ``model``.

    Parameters
    ----------
    payload : dict
        A checkpoint written by :func:`train_base_model`, as ``torch.load`` returns it.
    config, model
        The settings and the network a resumed run would use.

    Returns
    -------
    list of str : one "name: <stored> in the checkpoint, <now> now" per setting that
    differs (empty when they all agree).
    """

    def show(settings: dict, key: str) -> str:
        return repr(settings[key]) if key in settings else "(not recorded)"

    differences = []
    for stored, now in (
        (json.loads(payload["config_json"]), config.identity()),
        (json.loads(payload["architecture_json"]), model.architecture()),
    ):
        differences += [
            f"{key}: {show(stored, key)} in the checkpoint, {show(now, key)} now"
            for key in sorted(stored.keys() | now.keys())
            if key not in stored or key not in now or stored[key] != now[key]
        ]
    return differences


def check_checkpoint_can_go_on(path: Path, payload: dict, config: TrainingConfig, model) -> None:
    """Raise ValueError, in one line, when the run of the checkpoint at ``path``
    (``payload``) cannot go on to ``config.iterations`` with ``config`` and ``model``: it is
    finished (its optimiser state dropped) short of them, or it has other settings (each
    named)."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a PatientFineTune training checkpoint")
    iteration = int(payload["iteration"])
    if payload["optimizer"] is None and iteration < config.iterations:
        raise ValueError(
            f"checkpoint {path} is finished at {iteration} iterations (a finished run's: its optimiser state "
            "dropped), so it cannot go on exactly; train on in a new run started from its weights"
        )
    differences = checkpoint_setting_differences(payload, config, model)
    if differences:
        raise ValueError(
            f"checkpoint {path} was written with different settings ({'; '.join(differences)}); resume with the "
            "same settings (only --iterations may change) or delete the checkpoint to start over"
        )


def _load_checkpoint(path: Path, model, optimizer, config: TrainingConfig, averaged=None) -> int:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    check_checkpoint_can_go_on(path, payload, config, model)
    model.load_state_dict(payload["model"])
    if averaged is not None:
        averaged.load_state_dict(payload["averaged_model"])
    if payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return int(payload["iteration"])


def finish_checkpoint(path: Path, iteration: int | None = None) -> int:
    """Rewrite a finished run's checkpoint without its optimiser state, atomically.

    Adam's two moments per weight are two thirds of the file; the weights alone are what
    a model export and a new run initialised from the checkpoint need. The run itself can
    no longer go on exactly: resuming it past its iteration is refused.

    Parameters
    ----------
    path : Path
        The run's checkpoint (written by :func:`train_base_model`).
    iteration : int, optional
        Where the run ended; a checkpoint that stands elsewhere (a run still under way) is
        refused and left as it is.

    Returns
    -------
    int
        The checkpoint's iteration.

    Raises
    ------
    ValueError
        When ``path`` is not a training checkpoint or stands at another iteration.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a PatientFineTune training checkpoint")
    reached = int(payload["iteration"])
    if iteration is not None and reached != iteration:
        raise ValueError(f"{Path(path).name} stands at {reached} iterations, not {iteration}")
    write_torch_file({**payload, "optimizer": None}, Path(path), overwrite=True)
    return reached


def validation_scores(
    model: LesionNet, cases: Sequence[Case], training_spacing, device, preset: str | None = None
) -> dict:
    """Mean Dice and lesion F1 of whole-volume segmentation over validation cases (model
    left in eval), post-processed as the model will be used (``preset``'s opening and
    smallest lesion)."""
    # imported here: the metrics module needs SimpleITK, training does not, so a machine
    # without it can train (Resources/Models/gpu_training.py)
    from .inference import predict_mask
    from .metrics import dice, lesion_detection

    bundle = ModelBundle(model, {"training_spacing_mm": list(training_spacing), "preset": preset})
    masks = [predict_mask(bundle, case, device=device) for case in cases]
    if not masks:
        return {"dice": float("nan"), "lesion_f1": float("nan")}
    return {
        "dice": float(np.nanmean([dice(m, c.lesions) for m, c in zip(masks, cases)])),
        "lesion_f1": float(np.nanmean([lesion_detection(m, c.lesions)["lesion_f1"] for m, c in zip(masks, cases)])),
    }


def train_base_model(
    model: LesionNet,
    train_cases: Sequence[Case] | PatchPool,
    training_spacing: Sequence[float],
    config: TrainingConfig | None = None,
    val_cases: Sequence[Case] = (),
    device: str | torch.device = "auto",
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    validate_every: int = 1000,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    cancel: Callable[[], bool] | None = None,
    preset: str | None = None,
    synthetic=None,
    on_validation: Callable[[dict], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
    workers: int = 0,
) -> list[dict]:
    """Train ``model`` in place on normalised cases and/or ``synthetic`` patches (an
    :class:`~PatientFineTuneLib.synth.anatomy_patches.AnatomyPatches`, mixed in as
    ``config.synthetic_fraction`` says); returns the history. ``train_cases`` may also be
    a ready :class:`PatchPool` (:func:`pool_of_slices` of slices packed where the cases
    could be read, for a machine without image I/O).

    Checkpoints (model, optimiser, iteration) are written atomically every
    ``checkpoint_every`` iterations; ``resume=True`` continues from ``checkpoint_path``.
    Validation Dice and lesion F1 on ``val_cases`` are logged every ``validate_every``
    iterations and at the end, post-processed as ``preset`` says (:func:`validation_scores`). ``cancel()``
    returning True stops at the next iteration with :class:`Cancelled`, after
    checkpointing the steps taken since the last checkpoint (a resumed run goes on from there).

    ``on_validation(record)`` receives each validated history record as it is made (a
    long run's learning curve survives its process), while ``model`` holds the weights
    validated; ``on_step(record)`` every record (iteration and loss), also of a run that is
    then cancelled.

    With ``config.weight_average_decay`` the run keeps an exponential moving average of the
    weights (:func:`update_weight_average`, in the checkpoint beside the weights it resumes
    from): validation scores the average, and ``model`` ends holding it, also when cancelled.

    ``workers`` > 0 draws the batches ahead in that many processes
    (:func:`prefetched_batches`); the batches, and so the model, are the same as with 0.

    Inside an initialised process group (see :func:`init_distributed`) ``train_cases``
    is this process's shard; the model is trained with DistributedDataParallel and only
    rank 0 writes checkpoints, validates and shows progress.
    """
    from tqdm.auto import tqdm

    config = config or TrainingConfig()
    device = resolve_device(device)
    rank, world = distributed_rank_and_size()
    model.to(device).train()
    optimizer = Adam(model.parameters(), lr=config.learning_rate)
    # starts from the weights the run starts from (a new run's initial or --init-from weights)
    averaged = copy.deepcopy(model) if config.weight_average_decay else None
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    start = 0
    if resume:
        if checkpoint_path is None or not checkpoint_path.is_file():
            raise FileNotFoundError(f"cannot resume: checkpoint {checkpoint_path} does not exist")
        start = _load_checkpoint(checkpoint_path, model, optimizer, config, averaged)
        model.to(device)
        if averaged is not None:
            averaged.to(device)
        log(f"resumed from {checkpoint_path} at iteration {start}")
    if not train_cases and synthetic is None:
        raise ValueError("nothing to train on: give training cases, anatomy synthesis, or both")
    if isinstance(train_cases, PatchPool):
        pool = train_cases
    else:
        pool = (
            build_patch_pool(train_cases, training_spacing, config.patches_per_slice, config.seed + rank)
            if train_cases
            else None
        )
    where = f"process {rank} of {world}, " if world > 1 else ""
    real = f"{len(pool)} lesion slices x {config.patches_per_slice} patches" if pool is not None else "no real cases"
    share = 1.0 if pool is None else config.synthetic_fraction if synthetic is not None else 0.0
    log(f"training on {real}, {share:.0%} of patches synthesised from anatomy, {where}device {device}")
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        network = model
    history: list[dict] = []
    bar = tqdm(
        total=config.iterations, initial=start, disable=not progress or rank > 0, desc="train-base", mininterval=2.0
    )

    def after_step(done: int, loss: float) -> None:
        record = {"iteration": done, "loss": loss}
        history.append(record)
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if averaged is not None:
            update_weight_average(averaged, model, config.weight_average_decay)
        if on_step is not None:
            on_step(record)
        if rank > 0:
            return
        if checkpoint_path is not None and (done % checkpoint_every == 0 or done == config.iterations):
            _save_checkpoint(checkpoint_path, model, optimizer, done, config, averaged)
        if val_cases and (done % validate_every == 0 or done == config.iterations):
            training_weights = None
            if averaged is not None:  # validate the average; training goes on from its own weights
                training_weights = copy.deepcopy(model.state_dict())
                model.load_state_dict(averaged.state_dict())
            scores = validation_scores(model, val_cases, training_spacing, device, preset)
            record["val_dice"], record["val_lesion_f1"] = scores["dice"], scores["lesion_f1"]
            model.train()
            bar.write(
                f"iteration {done}: loss {loss:.4f}, validation Dice {scores['dice']:.3f}, lesion F1 {scores['lesion_f1']:.3f}"
            )
            if on_validation is not None:
                on_validation(record)
            if training_weights is not None:
                model.load_state_dict(training_weights)

    batches = prefetched_batches(pool, synthetic, config, start, rank, workers) if workers > 0 else None
    try:
        training_loop(
            patch_loss(network, pool, config, device, rank, synthetic, batches),
            optimizer,
            range(start, config.iterations),
            seed=config.seed,
            device=device,
            precision=config.precision,
            rank=rank,
            world=world,
            after_step=after_step,
            cancel=cancel,
        )
    except Cancelled:
        # a deadline rarely falls on a checkpoint: keep the steps taken since the last one
        done = history[-1]["iteration"] if history else start
        if checkpoint_path is not None and rank == 0 and done > start and done % checkpoint_every:
            _save_checkpoint(checkpoint_path, model, optimizer, done, config, averaged)
        raise
    finally:
        bar.close()
        if averaged is not None:  # the run's model is its average, also when it stops early
            model.load_state_dict(averaged.state_dict())
    model.eval()
    return history
