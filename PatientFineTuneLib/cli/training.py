"""The verbs that make training data and base models: ``synth``, ``train-base`` and
``transfer``."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from ..files import check_output_file, check_output_folder, refuse_existing
from .common import (
    add_precision_option,
    add_training_data_options,
    add_verb,
    command_line,
    count_at_least,
    derived_model_paths,
    report_result,
    scan_options,
    step,
    train_and_save,
)


def register(sub) -> None:
    from ..presets import PRESETS
    from ..synth import PRESET_GENERATORS

    p = add_verb(sub, "synth", cmd_synth, "Generate synthetic baseline/follow-up patient pairs.")
    p.add_argument("--preset", choices=PRESET_GENERATORS, required=True)
    p.add_argument("--patients", type=count_at_least(1), default=1, help="number of patient pairs (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first patient; patient i uses seed+i")
    p.add_argument("--out", required=True, help="output folder; patients go to OUT/patientNNN")
    p.add_argument("--small", action="store_true", help="small, coarse volumes for quick tests")
    p.add_argument("--overwrite", action="store_true")

    p = add_verb(sub, "train-base", cmd_train_base, "Train a base model (paper configuration by default).")
    p.add_argument("--preset", choices=list(PRESETS), required=True)
    add_training_data_options(p, "cases")
    p.add_argument("--val", help="held-out cases (folder or CSV) for validation Dice")
    p.add_argument("--out", required=True, help="model file to write (.pt)")
    p.add_argument("--iterations", type=count_at_least(1), default=10_000)
    p.add_argument(
        "--architecture",
        choices=["lesionnet", "unet3d"],
        default="lesionnet",
        help="lesionnet: the paper's 2D multi-pathway network; unet3d: the 3D U-Net of Wahlig et al. 2023 (whole volumes, no checkpoints)",
    )
    p.add_argument(
        "--width",
        type=count_at_least(1),
        default=64,
        help="filters per 3x3 conv (paper 64; 16 for a quick CPU model); unet3d: filters of its first level",
    )
    p.add_argument(
        "--spacing-mm",
        type=float,
        default=2.0,
        help="unet3d: isotropic voxel size it trains and predicts at (paper 1; 2 for a CPU)",
    )
    p.add_argument("--patch-mm", type=float, default=96.0, help="unet3d: patch edge in mm (paper 96)")
    p.add_argument("--batch-size", type=count_at_least(1), default=4)
    p.add_argument("--patches-per-slice", type=count_at_least(1), default=25)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps; under torchrun each process uses cuda:LOCAL_RANK",
    )
    add_precision_option(p)
    p.add_argument(
        "--channels-last", action="store_true", help="channels-last tensors (faster convolutions on recent GPUs)"
    )
    p.add_argument("--checkpoint", help="checkpoint file (default OUT.checkpoint)")
    p.add_argument("--checkpoint-every", type=count_at_least(1), default=500)
    p.add_argument("--validate-every", type=count_at_least(1), default=1000)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--overwrite", action="store_true")

    p = add_verb(
        sub,
        "transfer",
        cmd_transfer,
        "Adapt a trained 3D U-Net to another disease or site with a few annotated studies (Kaur et al. 2019).",
    )
    p.add_argument("--model", required=True, help="source 3D U-Net model file")
    add_training_data_options(p, "target cases")
    p.add_argument("--out", required=True, help="model file to write (never the source model)")
    p.add_argument(
        "--strategy",
        choices=["all", "decoder", "last-layers", "head"],
        default="all",
        help="which layers train: all (FT_All, best with few cases), decoder, last-layers (FT_LastThree), head (output layer)",
    )
    p.add_argument("--reset-last-layers", action="store_true", help="replace the last three layers with new ones first")
    p.add_argument("--iterations", type=count_at_least(1), default=1000)
    p.add_argument("--batch-size", type=count_at_least(1), default=2)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    add_precision_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")


def cmd_synth(args) -> None:
    from tqdm.auto import tqdm

    from ..synth import generate_pair, write_pair

    out = check_output_folder(args.out)
    targets = [out / f"patient{args.seed + i:03d}" for i in range(args.patients)]
    refuse_existing(targets, args.overwrite)
    for i, target in enumerate(tqdm(targets, desc=f"synth {args.preset}", unit="patient")):
        pair = generate_pair(args.preset, args.seed + i, small=args.small)
        write_pair(pair, target, overwrite=args.overwrite)
    print(f"wrote {len(targets)} {args.preset} patient pair(s) under {out}")
    report_result(args, "synth", {t.name: t for t in targets})


def load_training_cases(args, root, sequences, auto_organ: bool, shard: tuple[int, int] = (0, 1)):
    """The annotated cases under ``root`` with this verb's scan options, with a progress bar."""
    from functools import partial

    from tqdm.auto import tqdm

    from ..caseload import load_training_cases as load

    return load(
        root,
        sequences,
        auto_organ=auto_organ,
        options=scan_options(args),
        shard=shard,
        progress=partial(tqdm, desc=f"loading {root}", unit="case", leave=False),
    )


def cmd_train_base(args) -> None:
    import torch

    from ..model import LesionNet, count_parameters
    from ..modelfile import ModelBundle, make_metadata, save_model
    from ..presets import get_preset
    from ..training import TrainingConfig, distributed_rank_and_size, init_distributed, train_base_model

    preset = get_preset(args.preset)
    out = check_output_file(args.out, suffix=".pt")
    refuse_existing([out], args.overwrite)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".checkpoint")
    if checkpoint.exists() and not args.resume:
        raise FileExistsError(
            f"checkpoint {checkpoint} exists from an earlier run; pass --resume to continue it or delete it"
        )
    config = TrainingConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        patches_per_slice=args.patches_per_slice,
        learning_rate=args.learning_rate,
        seed=args.seed,
        precision=args.precision,
        channels_last=args.channels_last,
    )
    device = init_distributed(args.device)  # joins the process group under torchrun
    rank, world = distributed_rank_and_size()
    sequences = preset.sequence_dicts()
    if args.architecture == "unet3d":
        if world > 1 or args.resume:
            raise ValueError("the 3D U-Net trains in one process without checkpoints; drop torchrun / --resume")
        return _train_unet3d(args, preset, device, out)
    train_cases = load_training_cases(args, args.train, sequences, preset.auto_organ_mask, shard=(rank, world))
    val_cases = load_training_cases(args, args.val, sequences, preset.auto_organ_mask) if args.val and rank == 0 else []
    torch.manual_seed(args.seed)  # He-uniform initialisation, identical on every process
    model = LesionNet([s["channels"] for s in sequences], width=args.width)
    if rank == 0:
        print(
            f"{count_parameters(model):,} parameters, receptive field {model.receptive_field()} px, device {device}"
            + (f", {world} processes" if world > 1 else "")
        )
    start = time.perf_counter()
    history = train_base_model(
        model,
        train_cases,
        preset.training_spacing_mm,
        config,
        val_cases=val_cases,
        device=device,
        checkpoint_path=checkpoint,
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        resume=args.resume,
        log=print if rank == 0 else (lambda message: None),
        preset=preset.name,
    )
    wall = time.perf_counter() - start
    if world > 1:
        train_names = _gather_names([c.name for c in train_cases])
        # every rank's sends and receives complete before any rank tears gloo down: a rank
        # that destroyed the group while another's last transfer was in flight aborted at
        # exit (SIGABRT, "terminate called without an active exception"), now and then
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    else:
        train_names = [c.name for c in train_cases]
    if rank > 0:
        return
    final_val = [h["val_dice"] for h in history if "val_dice" in h]
    metadata = make_metadata(
        model,
        sequences,
        preset.training_spacing_mm,
        preset=preset.name,
        training={
            "command": command_line(),
            "config": config.identity() | {"iterations": config.iterations},
            "train_cases": train_names,
            "processes": world,
            "val_cases": [c.name for c in val_cases],
            "train_data": str(args.train),
            "final_loss": history[-1]["loss"] if history else None,
            "final_val_dice": final_val[-1] if final_val else None,
            "wall_time_s": round(wall, 1),
            "hardware": (
                torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"{device.type} ({platform.processor() or platform.machine()})"
            )
            + (f" x {world} processes" if world > 1 else ""),
        },
    )
    sha = save_model(ModelBundle(model, metadata), out, overwrite=args.overwrite)
    checkpoint.unlink(missing_ok=True)
    print(f"saved {out} (sha256 {sha[:16]}..., {wall:.0f} s)")
    report_result(args, "train-base", {"model": out}, sha256=sha)


def _train_unet3d(args, preset, device, out: Path) -> None:
    """``train-base --architecture unet3d``: the 3D U-Net on whole volumes."""
    from ..modelfile import ModelBundle, config_record, make_metadata, save_model
    from ..volume_training import VolumeTrainingConfig, new_volume_model, train_volume_model, volume_model_metadata

    sequences = preset.sequence_dicts()
    cases = load_training_cases(args, args.train, sequences, preset.auto_organ_mask)
    config = VolumeTrainingConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        spacing_mm=args.spacing_mm,
        patch_mm=args.patch_mm,
        seed=args.seed,
        precision=args.precision,
    )
    model = new_volume_model([s["channels"] for s in sequences], width=args.width, seed=args.seed)
    print(
        f"3D U-Net, {sum(p.numel() for p in model.parameters()):,} parameters, {config.patch_voxels(model.size_multiple)}^3-voxel patches "
        f"at {config.spacing_mm} mm, {len(cases)} case(s), device {device}"
    )
    start = time.perf_counter()
    with step(args, "train-base", config.iterations) as progress:
        losses = train_volume_model(model, cases, config, device=device, progress=progress.training_callback())
    wall = time.perf_counter() - start
    metadata = make_metadata(
        model,
        sequences,
        (config.spacing_mm,) * 3,
        preset=preset.name,
        **volume_model_metadata(config, model),
        training={
            "command": command_line(),
            "config": config_record(config),
            "train_cases": [c.name for c in cases],
            "train_data": str(args.train),
            "final_loss": losses[-1] if losses else None,
            "wall_time_s": round(wall, 1),
            "hardware": device.type,
        },
    )
    sha = save_model(ModelBundle(model.cpu(), metadata), out, overwrite=args.overwrite)
    print(f"saved {out} (sha256 {sha[:16]}..., {wall:.0f} s)")
    report_result(args, "train-base", {"model": out}, sha256=sha)


def _gather_names(names: list[str]) -> list[str]:
    """Every process's training case names, in case order (rank 0 records them all)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted(n for part in gathered for n in part)


def cmd_transfer(args) -> None:
    """Adapt a trained 3D U-Net to a new disease or site with a few studies."""
    from ..modelfile import load_model
    from ..volume_training import VolumeTrainingConfig, finetune_volume_model

    out, model = derived_model_paths(args, "source")
    bundle = load_model(model)
    if not bundle.is_volume_model:
        raise ValueError(
            f"{model} holds the 2D network; transfer strategies apply to the 3D U-Net (train-base --architecture unet3d)"
        )
    cases = load_training_cases(args, args.train, bundle.sequences, bundle.auto_organ_mask)
    config = VolumeTrainingConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        strategy=args.strategy,
        reset_last_layers=args.reset_last_layers,
        seed=args.seed,
        precision=args.precision,
    )
    info, sha = train_and_save(
        args,
        "transfer",
        config.iterations,
        lambda progress: finetune_volume_model(
            bundle, cases, config, device=args.device, progress=progress.training_callback()
        ),
        out,
    )
    print(
        f"trained the {args.strategy} layers on {len(cases)} case(s) in {info['wall_time_s']} s; saved {out} (sha256 {sha[:16]}...)"
    )
    report_result(args, "transfer", {"model": out}, sha256=sha)
