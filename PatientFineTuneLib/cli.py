"""The ``patient-finetune`` command line: thin verbs over the library.

Every verb refuses to overwrite existing outputs unless ``--overwrite``, exits non-zero
with a one-line explanation on bad input, and writes files atomically. ``--progress json``
(before the verb) replaces the progress bars by one JSON line per step on stdout, plus a
``result`` line naming what was written and an ``error`` line on failure, for programs
that run the verbs as jobs (:mod:`.jobs`, the Slicer module).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .files import check_output_file, check_output_folder, json_ready, refuse_existing, refuse_inputs_as_outputs
from .modelcard import resolve_model_path  # torch-free: the CLI starts fast
from .progress import MODES as PROGRESS_MODES
from .progress import StepProgress, emit, send_events_to

def _step(args, name: str, total: int | None = None, unit: str = "it") -> StepProgress:
    """Progress of one step in this invocation's ``--progress`` mode."""
    return StepProgress(args.progress, name, total, unit)


def _note(args, text: str) -> None:
    """What the command did to the inputs that the user should know: a ``note`` event with
    ``--progress json`` (the Slicer module and jobs show it), else a line on stderr (suggest
    prints its result as JSON on stdout)."""
    if args.progress == "json":
        emit("note", text=text)
    else:
        print(text, file=sys.stderr)


def _report_device(args, device) -> None:
    """The machine-readable line of what runs the network (``--progress json`` only)."""
    if args.progress == "json":
        from .runtime import describe_device

        emit("device", description=describe_device(device))


def _report_result(args, verb: str, outputs: dict, **fields) -> None:
    """The machine-readable line of what a verb wrote (``--progress json`` only)."""
    if args.progress == "json":
        emit("result", verb=verb, outputs={k: str(v) for k, v in outputs.items()}, **fields)


def _command_line() -> str:
    """This invocation, as it would be typed (recorded in model files)."""
    return "patient-finetune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def count_at_least(minimum: int):
    """argparse type: an integer of at least ``minimum`` (a count such as --iterations)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {value}: must be at least {minimum}")
        return value

    parse.__name__ = f"count >= {minimum}"
    return parse


def fraction(text: str) -> float:
    """argparse type: a fraction in (0, 1] (such as --pixel-fraction)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: must be above 0 and at most 1")
    return value


def mc_sample_count(text: str) -> int:
    """argparse type of --mc-samples: 0 (no uncertainty) or at least 2 (an SD needs two)."""
    value = count_at_least(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("invalid value 1: use 0 for no uncertainty map, or at least 2 samples (the paper: 25)")
    return value


def _case_inputs(case, model: Path) -> list:
    sources = case.sources
    return [*sources["sequences"], sources.get("organ"), sources.get("lesions"), model]


def label_list(text: str) -> list[int]:
    """argparse type of --lesion-labels: comma-separated whole numbers."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected comma-separated whole numbers such as 1,2") from None


# ---------------------------------------------------------------------------------------
# synth


def cmd_synth(args) -> None:
    from tqdm.auto import tqdm

    from .synth import generate_pair, write_pair

    out = check_output_folder(args.out)
    targets = [out / f"patient{args.seed + i:03d}" for i in range(args.patients)]
    refuse_existing(targets, args.overwrite)
    for i, target in enumerate(tqdm(targets, desc=f"synth {args.preset}", unit="patient")):
        pair = generate_pair(args.preset, args.seed + i, small=args.small)
        write_pair(pair, target, overwrite=args.overwrite)
    print(f"wrote {len(targets)} {args.preset} patient pair(s) under {out}")
    _report_result(args, "synth", {t.name: t for t in targets})


# ---------------------------------------------------------------------------------------
# train-base


def _load_cases(root, sequences, args, require_lesions: bool, shard: tuple[int, int] = (0, 1)):
    """Load and normalise the cases under ``root``; ``shard=(rank, world)`` keeps every
    world-th case starting at rank (each distributed training process loads only its own)."""
    from tqdm.auto import tqdm

    from .cases import find_cases
    from .images import load_case, prepare_case

    names = [s["name"] for s in sequences]
    files = find_cases(root, names)
    rank, world = shard
    if len(files) < world:
        raise ValueError(f"{len(files)} training case(s) cannot be shared among {world} processes; use at most {len(files)}")
    files = files[rank::world]
    cases = []
    for f in tqdm(files, desc=f"loading {root}", unit="case", leave=False):
        if require_lesions and f.lesions is None:
            raise FileNotFoundError(f"case {f.name} has no lesion mask (lesions.nii.gz or a 'lesions' manifest column)")
        case = load_case(
            f.sequences,
            organ_path=f.organ,
            lesion_path=f.lesions,
            expected_channels=[s["channels"] for s in sequences],
            sequence_names=names,
            resample_to_first=args.resample_to,
            lesion_labels=args.lesion_labels,
            auto_organ=args.auto_organ,
            name=f.name,
            skull_stripped=args.skull_stripped,
            bias_correction=args.bias_correction,
        )
        cases.append(prepare_case(case))
    return cases


def cmd_train_base(args) -> None:
    import torch

    from .model import LesionNet, count_parameters
    from .modelfile import ModelBundle, make_metadata, save_model
    from .presets import get_preset
    from .training import TrainingConfig, distributed_rank_and_size, init_distributed, train_base_model

    preset = get_preset(args.preset)
    out = check_output_file(args.out, suffix=".pt")
    refuse_existing([out], args.overwrite)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".checkpoint")
    if checkpoint.exists() and not args.resume:
        raise FileExistsError(f"checkpoint {checkpoint} exists from an earlier run; pass --resume to continue it or delete it")
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
    args.auto_organ = preset.auto_organ_mask
    sequences = preset.sequence_dicts()
    if args.architecture == "unet3d":
        if world > 1 or args.resume:
            raise ValueError("the 3D U-Net trains in one process without checkpoints; drop torchrun / --resume")
        return _train_unet3d(args, preset, device, out)
    train_cases = _load_cases(args.train, sequences, args, require_lesions=True, shard=(rank, world))
    val_cases = _load_cases(args.val, sequences, args, require_lesions=True) if args.val and rank == 0 else []
    torch.manual_seed(args.seed)  # He-uniform initialisation, identical on every process
    model = LesionNet([s["channels"] for s in sequences], width=args.width)
    if rank == 0:
        print(f"{count_parameters(model):,} parameters, receptive field {model.receptive_field()} px, device {device}"
              + (f", {world} processes" if world > 1 else ""))
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
            "command": _command_line(),
            "config": config.identity() | {"iterations": config.iterations},
            "train_cases": train_names,
            "processes": world,
            "val_cases": [c.name for c in val_cases],
            "train_data": str(args.train),
            "final_loss": history[-1]["loss"] if history else None,
            "final_val_dice": final_val[-1] if final_val else None,
            "wall_time_s": round(wall, 1),
            "hardware": (torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({platform.processor() or platform.machine()})")
            + (f" x {world} processes" if world > 1 else ""),
        },
    )
    sha = save_model(ModelBundle(model, metadata), out, overwrite=args.overwrite)
    checkpoint.unlink(missing_ok=True)
    print(f"saved {out} (sha256 {sha[:16]}..., {wall:.0f} s)")
    _report_result(args, "train-base", {"model": out}, sha256=sha)


def _train_unet3d(args, preset, device, out: Path) -> None:
    """``train-base --architecture unet3d``: the 3D U-Net on whole volumes (seed 001)."""
    from .modelfile import ModelBundle, config_record, make_metadata, save_model
    from .volume_training import VolumeTrainingConfig, new_volume_model, train_volume_model, volume_model_metadata

    sequences = preset.sequence_dicts()
    cases = _load_cases(args.train, sequences, args, require_lesions=True)
    config = VolumeTrainingConfig(
        iterations=args.iterations, batch_size=args.batch_size, learning_rate=args.learning_rate,
        spacing_mm=args.spacing_mm, patch_mm=args.patch_mm, seed=args.seed, precision=args.precision,
    )
    model = new_volume_model([s["channels"] for s in sequences], width=args.width, seed=args.seed)
    print(f"3D U-Net, {sum(p.numel() for p in model.parameters()):,} parameters, {config.patch_voxels(model.size_multiple)}^3-voxel patches "
          f"at {config.spacing_mm} mm, {len(cases)} case(s), device {device}")
    start = time.perf_counter()
    with _step(args, "train-base", config.iterations) as step:
        losses = train_volume_model(model, cases, config, device=device, progress=step.training_callback())
    wall = time.perf_counter() - start
    metadata = make_metadata(
        model, sequences, (config.spacing_mm,) * 3, preset=preset.name, **volume_model_metadata(config, model),
        training={
            "command": _command_line(),
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
    _report_result(args, "train-base", {"model": out}, sha256=sha)


def _gather_names(names: list[str]) -> list[str]:
    """Every process's training case names, in case order (rank 0 records them all)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted(n for part in gathered for n in part)


# ---------------------------------------------------------------------------------------
# segment


def _case_for_model(args, bundle, lesions: bool = False):
    """Load and normalise the case named by --case/--images (+ --organ, --lesions) in the
    model's sequence order; returns (case, organ path or None)."""
    from .cases import find_image
    from .images import assign_series_uids, load_case, prepare_case, with_absent_sequences

    names = [s["name"] for s in bundle.sequences]
    # a model trained with sequence dropout reads scans without its trailing optional
    # sequences (a FLAIR-only follow-up to a FLAIR + T1 model)
    needed = len(names)
    while needed > 1 and bundle.sequences[needed - 1].get("optional"):
        needed -= 1
    lesion_path = getattr(args, "lesions", None)
    if args.case and args.images:
        raise ValueError("give --case FOLDER or --images FILES, not both")
    if args.case:
        folder = Path(args.case)
        paths = [find_image(folder, n) for n in names]
        found = next((i for i, p in enumerate(paths) if p is None), len(paths))  # sequences found, in order
        if found < needed or any(p is not None for p in paths[found:]):
            missing = [n for n, p in zip(names, paths) if p is None]
            raise FileNotFoundError(f"{folder} has no image for sequence(s) {', '.join(missing)} (expected {', '.join(n + '.nii.gz' for n in names)})")
        paths = paths[:found]
        organ = args.organ or find_image(folder, "organ")
        if lesions:
            lesion_path = lesion_path or find_image(folder, "lesions")
    else:
        if not args.images:
            raise ValueError(f"give --case FOLDER or --images with {len(names)} file(s) in the order {', '.join(names)}")
        if not needed <= len(args.images) <= len(names):
            optional = f" ({', '.join(names[needed:])} optional)" if needed < len(names) else ""
            raise ValueError(f"--images needs {len(names)} file(s) in the order {', '.join(names)}{optional}; got {len(args.images)}")
        paths, organ = args.images, args.organ
    if lesions and lesion_path is None:
        raise FileNotFoundError("this needs the baseline annotation: --lesions FILE (or lesions.nii.gz in the --case folder)")
    given = bundle.sequences[:len(paths)]
    series_uids = assign_series_uids(paths, args.series_uid)
    case = load_case(
        paths,
        organ_path=organ,
        lesion_path=lesion_path if lesions else None,
        expected_channels=[s["channels"] for s in given],
        sequence_names=[s["name"] for s in given],
        resample_to_first=args.resample_to,
        auto_organ=bundle.auto_organ_mask,
        skull_stripped=args.skull_stripped,
        bias_correction=args.bias_correction,
        series_uids=series_uids,
    )
    if organ is None and bundle.auto_organ_mask:
        _note(args, case.sources["organ"])
    if case.sources["bias_corrected"]:
        _note(args, "bias field corrected (N4) inside the brain mask")
    if len(given) < len(names):
        _note(args, f"no {', '.join(names[len(given):])}: this model was trained to read {', '.join(s['name'] for s in given)} without it")
        return with_absent_sequences(prepare_case(case), sum(s["channels"] for s in bundle.sequences)), organ
    return prepare_case(case), organ


def cmd_segment(args) -> None:
    from .inference import segment_case
    from .modelfile import load_model
    from .outputs import SEGMENT_FILES, write_segment_outputs

    out = check_output_folder(args.out)
    model = resolve_model_path(args.model)
    bundle = load_model(model)
    outputs = {role: out / name for role, name in SEGMENT_FILES.items()}
    case, organ = _case_for_model(args, bundle)
    refuse_inputs_as_outputs(_case_inputs(case, model), outputs.values())
    produced = {"segmentation", "labels", "probability", "table"} | ({"organ"} if organ is None else set())
    produced |= ({"uncertainty", "summary"} if args.mc_samples else set()) | ({"suggestions"} if args.suggest else set())
    refuse_existing([outputs[k] for k in produced], args.overwrite)
    _report_device(args, args.device)
    with _step(args, "segment", unit="slice") as step:
        result = segment_case(bundle, case, opening=args.opening, threshold=args.threshold, min_lesion_voxels=args.min_lesion_voxels,
                              mc_samples=args.mc_samples, seed=args.seed, device=args.device, progress=step.update)
    suggestions = None
    if args.suggest:
        from .suggest import suggest_slices

        suggestions = [s.as_dict() for s in suggest_slices(bundle, case, k=args.suggest, probability=result.probability)]
    written = write_segment_outputs(case, result, out, overwrite=args.overwrite, organ=organ is None, suggestions=suggestions,
                                    mc_samples=args.mc_samples, seed=args.seed)
    volume = sum(r["volume_mm3"] for r in result.lesions) / 1000
    print(f"{len(result.lesions)} lesion(s), {volume:.2f} mL; outputs in {out}")
    if result.uncertainty is not None:
        print(f"uncertainty ({args.mc_samples} MC-dropout samples): max SD {result.summary['max_sd']:.3f}, "
              f"mean SD in lesions {result.summary['mean_sd_in_lesions']:.3f}")
    if suggestions:
        print("suggested slices: " + ", ".join(str(s["slice"]) for s in suggestions))
    _report_result(args, "segment", written, lesions=len(result.lesions), volume_ml=volume)


def cmd_suggest(args) -> None:
    from .modelfile import load_model
    from .suggest import suggest_slices

    bundle = load_model(resolve_model_path(args.model))
    case, _ = _case_for_model(args, bundle, lesions=args.candidates == "lesion")
    suggestions = [s.as_dict() for s in suggest_slices(bundle, case, k=args.k, candidates=args.candidates, ranking=args.ranking, device=args.device)]
    print(json.dumps(suggestions, indent=2))
    _report_result(args, "suggest", {}, suggestions=suggestions)


def _derived_model_paths(args, role: str) -> tuple[Path, Path]:
    """(--out, --model) of a verb that trains a new model from another; the other model
    (``role``: base, source) is never the output, and --out is not replaced silently."""
    out, model = check_output_file(args.out, suffix=".pt"), resolve_model_path(args.model)
    if out.resolve() == model.resolve():
        raise ValueError(f"--out is the {role} model file; the {role} model is never overwritten, choose another name")
    refuse_existing([out], args.overwrite)
    return out, model


def _train_and_save(args, description: str, iterations: int, train, out: Path) -> tuple[dict, str]:
    """Run ``train(step) -> ModelBundle`` with progress reported on ``step`` (a
    :class:`StepProgress`), record its wall time and this command in its ``finetune``
    metadata and save it; returns (that record, sha256)."""
    from .modelfile import save_model

    start = time.perf_counter()
    with _step(args, description, iterations) as step:
        trained = train(step)
    info = trained.metadata["finetune"]
    info["wall_time_s"] = round(time.perf_counter() - start, 1)
    info["command"] = _command_line()
    return info, save_model(trained, out, overwrite=args.overwrite)


def cmd_finetune(args) -> None:
    from .finetune import finetune_patient_model, shipped_config
    from .modelfile import load_model

    out, model = _derived_model_paths(args, "base")
    bundle = load_model(model)
    if bundle.is_volume_model:
        _refuse_2d_options(args)
    case, _ = _case_for_model(args, bundle, lesions=True)
    refuse_inputs_as_outputs(_case_inputs(case, model), [out])
    check = args.check is not False and not bundle.is_volume_model  # the check holds out 2D slice blocks
    _report_device(args, args.device)
    chosen = {} if args.weighting == "preset" else {"weighting": None if args.weighting == "none" else args.weighting}
    config = shipped_config(bundle, iterations=args.iterations, seed=args.seed,
                            **({"method": args.method} if args.method else {}), **({"n_angles": args.angles} if args.angles is not None else {}),
                            **({"layers": args.layers} if args.layers else {}), holdout_check=check, precision=args.precision, **chosen,
                            **({"holdout_iterations": tuple(args.check_iterations)} if args.check_iterations else {}),
                            **({"hard_negative_slices": args.hard_negatives} if args.hard_negatives is not None else {}),
                            **({"pixel_fraction": args.pixel_fraction} if args.pixel_fraction is not None else {}))
    info, sha = _train_and_save(
        args, "finetune", config.progress_total(),
        lambda step: finetune_patient_model(bundle, case, args.slices, config, device=args.device, progress=step.training_callback(),
                                            phase=step.phase),
        out,
    )
    from .modelcard import describe_patient_model

    description = describe_patient_model(info)
    print(f"{description} ({info['wall_time_s']} s); saved {out} (sha256 {sha[:16]}...)")
    _report_result(args, "finetune", {"model": out}, sha256=sha, description=description,
                   base_model_kept=not info.get("holdout_check", {}).get("kept", True))


def _refuse_2d_options(args) -> None:
    """Refuse, before any work, the finetune options that only the 2D network has (a 3D
    U-Net would ignore them silently)."""
    given = [option for option, value in (("--method", args.method), ("--angles", args.angles), ("--hard-negatives", args.hard_negatives),
                                          ("--check", args.check), ("--pixel-fraction", args.pixel_fraction), ("--check-iterations", args.check_iterations))
             if value is not None and value is not False]  # --no-check agrees with a 3D U-Net; --angles 0 does not
    if given:
        raise ValueError(f"{', '.join(given)} applies to the 2D network only; this 3D U-Net fine-tunes on whole volumes without it "
                         "(no fixed angles, hard negatives or never-worse check): leave it out")


def cmd_transfer(args) -> None:
    """Adapt a trained 3D U-Net to a new disease or site with a few studies (seed 002)."""
    from .modelfile import load_model
    from .volume_training import VolumeTrainingConfig, finetune_volume_model

    out, model = _derived_model_paths(args, "source")
    bundle = load_model(model)
    if not bundle.is_volume_model:
        raise ValueError(f"{model} holds the 2D network; transfer strategies apply to the 3D U-Net (train-base --architecture unet3d)")
    args.auto_organ = bundle.auto_organ_mask
    cases = _load_cases(args.train, bundle.sequences, args, require_lesions=True)
    config = VolumeTrainingConfig(iterations=args.iterations, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                  strategy=args.strategy, reset_last_layers=args.reset_last_layers, seed=args.seed, precision=args.precision)
    info, sha = _train_and_save(
        args, "transfer", config.iterations,
        lambda step: finetune_volume_model(bundle, cases, config, device=args.device, progress=step.training_callback()),
        out,
    )
    print(f"trained the {args.strategy} layers on {len(cases)} case(s) in {info['wall_time_s']} s; saved {out} (sha256 {sha[:16]}...)")
    _report_result(args, "transfer", {"model": out}, sha256=sha)


# ---------------------------------------------------------------------------------------
# evaluate


def cmd_compare(args) -> None:
    import numpy as np
    import SimpleITK as sitk

    from .change import ChangeThresholds, lesion_changes, write_change_files
    from .files import output_set
    from .images import GeometryError, grid_mismatch, read_image, write_image
    from .registration import register_followup, resample_mask

    out = check_output_folder(args.out)
    targets = [out / n for n in ("changes.csv", "changes.json", "followup_lesions_on_baseline.nii.gz")]
    organ_file = args.baseline_organ if args.baseline_organ != "brain" else None
    refuse_inputs_as_outputs([args.baseline_lesions, args.followup_lesions, args.baseline_image, args.followup_image, organ_file], targets)
    if any(t.exists() for t in targets) and not args.overwrite:
        raise FileExistsError(f"{out} already holds compare outputs; choose another --out or pass --overwrite")
    baseline_lesions = read_image(args.baseline_lesions) > 0
    followup_lesions = read_image(args.followup_lesions) > 0
    registration = None
    if args.baseline_image and args.followup_image:
        baseline, followup = read_image(args.baseline_image), read_image(args.followup_image)
        organ = None
        if args.baseline_organ == "brain":
            from .brainmask import head_pair_for_registration

            baseline, followup, organ = head_pair_for_registration(baseline, followup)
        elif args.baseline_organ:
            organ = read_image(args.baseline_organ)
        try:
            registration = register_followup(baseline, followup, organ, bspline=args.bspline, seed=args.seed)
        except RuntimeError as exc:  # ITK's exception text is many lines of C++ context
            raise ValueError(f"registering the follow-up onto the baseline failed ({str(exc).strip().splitlines()[-1]}); check that "
                             "both images show the same anatomy, or give masks already on one grid without the images") from None
        before, after = (f"{c:.3f}" if np.isfinite(c) else "n/a" for c in (registration.correlation_before, registration.correlation_after))
        print(f"registered the follow-up onto the baseline: correlation {before} -> {after}")
        if registration.warning:
            print(f"warning: {registration.warning}", file=sys.stderr)
        followup_lesions = resample_mask(sitk.Cast(followup_lesions, sitk.sitkUInt8), baseline_lesions, registration.transform) > 0
    elif args.baseline_image or args.followup_image:
        raise ValueError("give both --baseline-image and --followup-image to register, or neither (masks already on one grid)")
    mismatch = grid_mismatch(baseline_lesions, followup_lesions)
    if mismatch:
        raise GeometryError(f"the lesion masks are on different grids ({mismatch}); give --baseline-image and --followup-image to register them")
    thresholds = ChangeThresholds(args.relative_change, args.min_change_mm3)
    rows, summary = lesion_changes(sitk.GetArrayFromImage(baseline_lesions), sitk.GetArrayFromImage(followup_lesions),
                                   baseline_lesions.GetSpacing()[::-1], thresholds, grid=baseline_lesions)
    if registration is not None:
        summary["registration"] = {"correlation_before": registration.correlation_before, "correlation_after": registration.correlation_after,
                                   "warning": registration.warning}
    with output_set(out, args.overwrite) as stage:  # the three files appear together or not at all
        write_change_files(rows, summary, stage)
        write_image(sitk.Cast(followup_lesions, sitk.sitkUInt8), stage / "followup_lesions_on_baseline.nii.gz")
    counts = ", ".join(f"{summary[c]} {c}" for c in ("new", "enlarged", "stable", "shrinking", "resolved"))
    print(f"{counts}; lesion load {summary['baseline_load_mm3'] / 1000:.2f} -> {summary['followup_load_mm3'] / 1000:.2f} mL; outputs in {out}")
    _report_result(args, "compare", {t.name: t for t in targets}, summary=summary)


def cmd_experiment(args) -> None:
    from .experiment import paper_arms, read_cohort, run_experiment, summary_table, write_folder_cohort, write_tumor_progression_cohort
    from .files import atomic_write
    from .modelfile import load_model
    from .plots import box_plots

    out = check_output_folder(args.out)
    model = resolve_model_path(args.model)
    bundle = load_model(model)
    names = [s["name"] for s in bundle.sequences]
    cohort_path = Path(args.cohort)
    if cohort_path.is_dir() and any(cohort_path.glob("*/Pre_Scan_T1.nii.gz")):
        cohort_path = write_tumor_progression_cohort(cohort_path, out / "cohort.csv", names[0])
    elif cohort_path.is_dir():
        cohort_path = write_folder_cohort(cohort_path, names, out / "cohort.csv")
    cohort = read_cohort(cohort_path, names)
    arms = paper_arms(bundle.preset.weighting if bundle.preset else None, args.iterations_axis, args.default_iterations)
    if args.arms:
        wanted = args.arms.split(",")
        unknown = [a for a in wanted if a not in {arm.name for arm in arms}]
        if unknown:
            raise ValueError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(a.name for a in arms)}")
        arms = [a for a in arms if a.name in wanted]
    mc_arms = args.mc_arms.split(",") if args.mc_arms else ["base", f"ft-iter{args.default_iterations}"]
    print(f"{len(cohort)} patients x {len(arms)} arms ({', '.join(a.name for a in arms)}), {args.workers} worker(s)")
    rows = run_experiment(cohort, str(model), arms, out, workers=args.workers, seed=args.seed, mc_samples=args.mc_samples, mc_arms=mc_arms)
    table = summary_table(rows)
    box_plots(rows, out / "boxplots.png", title=f"{bundle.preset.name if bundle.preset else model.name}: {len(cohort)} patients")
    text = (f"# Experiment\n\nModel `{model}` (sha256 {bundle.sha256[:16]}...), cohort `{cohort_path}`, {len(cohort)} patients.\n\n{table}\n\n"
            "![box plots](boxplots.png)\n\nPer patient: `results.csv`, masks in `masks/`, outlines in `overlays/`.\n")
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text), overwrite=True)
    print(table)
    _report_result(args, "experiment", {"results": out / "results.csv", "summary": out / "summary.md", "boxplots": out / "boxplots.png"})


def cmd_evaluate(args) -> None:
    import csv

    from .images import read_image
    from .metrics import DETECTION_METRICS, METRIC_NAMES, SEGMENTATION_METRICS, compare_cohorts, evaluate_images, format_mean_sd, format_median_iqr
    from .postprocess import write_csv

    if args.out:
        check_output_file(args.out, suffix=".csv")
        refuse_inputs_as_outputs([args.pred, args.gt, args.pairs, args.compare_to], [args.out])
        refuse_existing([args.out], args.overwrite)
    if args.pairs:
        with open(args.pairs, newline="") as f:
            rows = list(csv.DictReader(f))
        missing = {"case", "pred", "gt"} - set(rows[0] if rows else {})
        if missing or not rows:
            raise ValueError(f"{args.pairs} needs a header with the columns case,pred,gt and one row per case "
                             f"(missing: {', '.join(sorted(missing)) or 'rows'})")
        base = Path(args.pairs).parent
        pairs = [(r["case"], base / r["pred"], base / r["gt"]) for r in rows]
    elif args.pred and args.gt:
        pairs = [(Path(args.pred).name, Path(args.pred), Path(args.gt))]
    else:
        raise ValueError("give --pred and --gt, or --pairs CSV with columns case,pred,gt")
    results = []
    for name, pred, gt in pairs:
        metrics = evaluate_images(read_image(pred), read_image(gt))
        results.append({"case": name} | {k: metrics[k] for k in METRIC_NAMES})
    for r in results:
        print(json.dumps(json_ready({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})))
    if len(results) > 1:
        for k in SEGMENTATION_METRICS:
            print(f"{k}: mean ± SD {format_mean_sd([r[k] for r in results])}")
        for k in DETECTION_METRICS:
            print(f"{k}: median [IQR] {format_median_iqr([r[k] for r in results])}")
    if args.out:
        write_csv(results, args.out, columns=["case", *METRIC_NAMES], overwrite=args.overwrite)
    comparison = []
    if args.compare_to:
        with open(args.compare_to, newline="") as f:
            reference = list(csv.DictReader(f))
        print(f"paired comparison with {args.compare_to} (p < 0.01 marked *, as in the paper):")
        comparison = compare_cohorts(results, reference)
        for row in comparison:
            mark = "*" if row["p"] < 0.01 else ""
            print(f"  {row['metric']}: {row['results']} vs {row['reference']} ({row['summary']}; "
                  f"{row['test']} p = {row['p']:.3g}{mark}, n = {row['n']})")
    _report_result(args, "evaluate", {"metrics": Path(args.out)} if args.out else {}, cases=results, **({"comparison": comparison} if comparison else {}))


# ---------------------------------------------------------------------------------------
# info and demo


def cmd_report(args) -> None:
    from .report import ReportInputs, write_report

    out = check_output_file(args.out, suffix=".html")
    results = {}
    for item in args.results:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise ValueError(f"--results takes LABEL=FOLDER (e.g. fine-tuned=seg-ft/), not {item!r}")
        if label in results:
            raise ValueError(f"--results names {label!r} twice ({results[label]} and {folder}); give each result its own label")
        results[label] = Path(folder)
    inputs = ReportInputs(Path(args.followup_image), results, title=args.title, truth=_optional_path(args.truth),
                          patient_model=_optional_path(args.model), changes=_optional_path(args.changes),
                          suggestions=_optional_path(args.suggestions))
    refuse_inputs_as_outputs([args.followup_image, args.truth, args.model, args.suggestions], [out])
    refuse_existing([out], args.overwrite)
    write_report(inputs, out, overwrite=args.overwrite)
    print(f"wrote {out}")
    _report_result(args, "report", {"report": out})


def _optional_path(value):
    return Path(value) if value else None


def cmd_web(args) -> None:
    import importlib.util

    if importlib.util.find_spec("trame_slicer") is None:
        raise RuntimeError('the web app needs trame-slicer: pip install -e ".[web]"')
    from .web import main as serve

    serve(host=args.host, port=args.port, model=args.model, work_dir=args.work, device=args.device, data_dir=args.data,
          allowed_hosts=args.allow_host)


def cmd_info(args) -> None:
    from .model import count_parameters
    from .modelfile import load_model

    bundle = load_model(resolve_model_path(args.model))
    if args.card:
        from .modelcard import render_card

        card = render_card(bundle.metadata, count_parameters(bundle.model))
        print(card)
        _report_result(args, "info", {}, card=card)
        return
    print(json.dumps(bundle.metadata | {"parameters": count_parameters(bundle.model)}, indent=2))
    _report_result(args, "info", {}, metadata=bundle.metadata, parameters=count_parameters(bundle.model))


def cmd_demo(args) -> None:
    from .demo import run_demo

    out = check_output_folder(args.out)
    summary = run_demo(out, overwrite=args.overwrite, model=resolve_model_path(args.model), device=args.device,
                       finetune_iterations=args.iterations, mc_samples=args.mc_samples, seed=args.seed)
    _report_result(args, "demo", {"folder": out, "summary": out / "demo-summary.json"}, summary=summary)


# ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error also sent as an ``error`` event when the command line
    asks for ``--progress json`` (argparse's own text goes to stderr as always)."""

    json_errors = False  # set by main() before parsing; the verbs' subparsers share it

    def error(self, message):
        if _Parser.json_errors:
            emit("error", message=f"{self.prog}: error: {message}")
        super().error(message)


def _json_requested(argv: list[str]) -> bool:
    """Whether ``argv`` asks for ``--progress json`` (looked at before parsing, so that
    a usage error can be an event too)."""
    return "--progress=json" in argv or any(a == "--progress" and b == "json" for a, b in zip(argv, argv[1:]))


def build_parser() -> argparse.ArgumentParser:
    from .presets import PRESETS
    from .synth import PRESET_GENERATORS

    parser = _Parser(
        prog="patient-finetune",
        description="Patient-specific fine-tuning of a lesion-segmentation CNN (Jansen et al.).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="bar",
                        help="bar: progress bars on stderr (default); json: one JSON line per step on stdout, for programs; none")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    def add_scan_options(p):
        # the choices of brainmask.SKULL_STRIPPED_CHOICES and BIAS_CORRECTION_CHOICES, spelled
        # out so that --help does not import SimpleITK and scipy (load_case checks them)
        p.add_argument("--skull-stripped", choices=("auto", "yes", "no"), default="auto",
                       help="brain presets without --organ: is the scan skull-stripped? auto detects it; a skull-on scan is masked by deepbet")
        p.add_argument("--bias-correction", choices=("auto", "on", "off"), default="auto",
                       help="N4 bias-field correction inside the brain mask (auto: for skull-on scans without --organ)")

    def add_series_option(p):
        p.add_argument("--series-uid", action="append", default=[], metavar="UID",
                       help="for an image folder holding several DICOM series: the one to read (repeat it for each such folder, in the order of the images)")

    def add_precision_option(p):
        # training_loop.PRECISIONS, spelled out so that --help does not import torch
        p.add_argument("--precision", choices=("fp32", "amp"), default="fp32", help="amp: mixed precision (float16 on GPUs, bfloat16 on CPUs)")

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("synth", cmd_synth, "Generate synthetic baseline/follow-up patient pairs.")
    p.add_argument("--preset", choices=PRESET_GENERATORS, required=True)
    p.add_argument("--patients", type=count_at_least(1), default=1, help="number of patient pairs (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first patient; patient i uses seed+i")
    p.add_argument("--out", required=True, help="output folder; patients go to OUT/patientNNN")
    p.add_argument("--small", action="store_true", help="small, coarse volumes for quick tests")
    p.add_argument("--overwrite", action="store_true")

    p = add("train-base", cmd_train_base, "Train a base model (paper configuration by default).")
    p.add_argument("--preset", choices=list(PRESETS), required=True)
    p.add_argument("--train", required=True, help="folder of cases or CSV manifest")
    p.add_argument("--val", help="held-out cases (folder or CSV) for validation Dice")
    p.add_argument("--out", required=True, help="model file to write (.pt)")
    p.add_argument("--iterations", type=count_at_least(1), default=10_000)
    p.add_argument("--architecture", choices=["lesionnet", "unet3d"], default="lesionnet",
                   help="lesionnet: the paper's 2D multi-pathway network; unet3d: the 3D U-Net of seed 001 (whole volumes, no checkpoints)")
    p.add_argument("--width", type=count_at_least(1), default=64, help="filters per 3x3 conv (paper 64; 16 for a quick CPU model); unet3d: filters of its first level")
    p.add_argument("--spacing-mm", type=float, default=2.0, help="unet3d: isotropic voxel size it trains and predicts at (paper 1; 2 for a CPU)")
    p.add_argument("--patch-mm", type=float, default=96.0, help="unet3d: patch edge in mm (paper 96)")
    p.add_argument("--batch-size", type=count_at_least(1), default=4)
    p.add_argument("--patches-per-slice", type=count_at_least(1), default=25)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps; under torchrun each process uses cuda:LOCAL_RANK")
    add_precision_option(p)
    p.add_argument("--channels-last", action="store_true", help="channels-last tensors (faster convolutions on recent GPUs)")
    p.add_argument("--checkpoint", help="checkpoint file (default OUT.checkpoint)")
    p.add_argument("--checkpoint-every", type=count_at_least(1), default=500)
    p.add_argument("--validate-every", type=count_at_least(1), default=1000)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--lesion-labels", type=label_list, help="comma-separated label values counted as lesion (default: any > 0)")
    p.add_argument("--resample-to", action="store_true", help="resample sequences/masks onto the first sequence's grid")
    add_scan_options(p)
    p.add_argument("--overwrite", action="store_true")

    p = add("segment", cmd_segment, "Segment lesions in one case with a model file.")
    p.add_argument("--model", required=True, help="model file, or a preset name for its shipped base model")
    p.add_argument("--case", help="case folder with one file per sequence (FLAIR.nii.gz, ...)")
    p.add_argument("--images", nargs="+", help="sequence files in the model's order (instead of --case)")
    p.add_argument("--organ", help="organ mask (default: organ.* in the case folder, else automatic brain mask)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--opening", action=argparse.BooleanOptionalAction, default=None, help="per-slice plus opening (default: from the model's preset)")
    p.add_argument("--min-lesion-voxels", type=count_at_least(1), default=None, metavar="N",
                   help="drop lesions of fewer than N voxels (default: from the model's preset: 2 for brain, 1 keeps every lesion)")
    p.add_argument("--device", default="auto")
    p.add_argument("--mc-samples", type=mc_sample_count, default=0, help="MC-dropout samples for the uncertainty map (paper: 25; 0 = off; else at least 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout masks")
    p.add_argument("--suggest", type=count_at_least(0), default=0, metavar="K",
                   help="also write suggestions.json: the K slices worth annotating first, from the same pass (0 = off)")
    p.add_argument("--resample-to", action="store_true", help="resample sequences onto the first sequence's grid")
    add_scan_options(p)
    add_series_option(p)
    p.add_argument("--overwrite", action="store_true")

    def add_case_options(p):
        p.add_argument("--model", required=True, help="model file, or a preset name for its shipped base model")
        p.add_argument("--case", help="case folder with one file per sequence (FLAIR.nii.gz, ...)")
        p.add_argument("--images", nargs="+", help="sequence files in the model's order (instead of --case)")
        p.add_argument("--organ", help="organ mask (default: organ.* in the case folder, else automatic brain mask)")
        p.add_argument("--lesions", help="baseline annotation (default: lesions.* in the case folder)")
        p.add_argument("--device", default="auto")
        p.add_argument("--resample-to", action="store_true", help="resample sequences onto the first sequence's grid")
        add_scan_options(p)
        add_series_option(p)

    p = add("suggest", cmd_suggest, "Rank baseline slices to annotate: mean lesion softmax closest to 0.5 first.")
    add_case_options(p)
    p.add_argument("-k", type=count_at_least(0), default=2, help="how many slices (0 = all, ranked)")
    p.add_argument("--candidates", choices=["organ", "lesion"], default="organ", help="all organ slices, or only annotated lesion slices")
    p.add_argument("--ranking", choices=["softmax", "entropy"], default="softmax")

    p = add("finetune", cmd_finetune, "Fine-tune a base model (its last two layers; every layer where many slices are annotated) on a patient's annotated baseline.")
    add_case_options(p)
    p.add_argument("--out", required=True, help="patient model file to write (never the base model)")
    p.add_argument("--slices", default="all-lesion", help="all-lesion (default), all-organ, suggested:K, suggested-lesion:K, or indices like 12,20")
    p.add_argument("--iterations", type=count_at_least(1), default=100)
    p.add_argument("--check-iterations", type=count_at_least(1), nargs="+", metavar="N",
                   help="iteration counts the never-worse check compares on the held-out part; the patient model trains the best "
                        "(default: 1, 2 and 4 times --iterations where the head trains; where each fold would hold out at least 3 whole "
                        "slices every layer trains, at twice the learning rate on one fold, comparing 1/2, 1 and 2 times --iterations, and the "
                        "patient model continues that fold's model for half the chosen count; "
                        "counts above --iterations replace it, where it does not help, only by a clear margin)")
    p.add_argument("--hard-negatives", type=count_at_least(0), metavar="K",
                   help="with --slices all-lesion: also train on the K lesion-free slices where the base model finds the most lesion "
                        "(default: the preset's, 6 for brain-tumor, 0 otherwise)")
    p.add_argument("--weighting", choices=["preset", "none", "segmentation", "detection"], default="preset",
                   help="pixel weighting of the loss (preset: the task's default, segmentation for brain-wmh, none for brain-tumor, "
                   "detection for liver-metastases; none for a 3D U-Net)")
    p.add_argument("--angles", type=count_at_least(0), help="fixed rotation angles spanning [-45, 45] degrees (default 8; 0: a continuous uniform "
                   "angle per patch, as in the paper; naive path; 2D network only)")
    p.add_argument("--method", choices=["auto", "fast", "naive"], help="fast: cached backbone features; naive: the reference loop; "
                   "auto (default): fast where the cache fits in memory (2D network only)")
    p.add_argument("--pixel-fraction", type=fraction,
                   help="the head runs, and the loss is taken, on this random fraction of each patch's pixels per iteration "
                        "(default 0.25: 3x faster where the head trains, 1.7x where every layer does, the same decisions on the "
                        "real scans; 1 = exact, the paper)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction,
                   help="never worse than the base model (default): fine-tune on each half of the annotation in turn and keep the base "
                        "model unless that beats it on the other half (about three times the head's training time; 2D network only)")
    p.add_argument("--layers", choices=["head", "all", "decoder", "last-layers"],
                   help="head: the last two layers (the paper; a 3D U-Net's output layer); all: every layer (seed 002's FT_All; naive loop, slower); "
                        "3D U-Net only: decoder, last-layers (default: the head, and every layer where the never-worse check holds out "
                        "at least 3 whole slices in each fold, i.e. about 6 or more annotated lesion slices)")
    add_precision_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    p = add("transfer", cmd_transfer, "Adapt a trained 3D U-Net to another disease or site with a few annotated studies (seed 002).")
    p.add_argument("--model", required=True, help="source 3D U-Net model file")
    p.add_argument("--train", required=True, help="folder of target cases or CSV manifest (with lesion masks)")
    p.add_argument("--out", required=True, help="model file to write (never the source model)")
    p.add_argument("--strategy", choices=["all", "decoder", "last-layers", "head"], default="all",
                   help="which layers train: all (FT_All, best with few cases in seed 002), decoder, last-layers (FT_LastThree), head (output layer)")
    p.add_argument("--reset-last-layers", action="store_true", help="replace the last three layers with new ones first, as seed 002 does")
    p.add_argument("--iterations", type=count_at_least(1), default=1000)
    p.add_argument("--batch-size", type=count_at_least(1), default=2)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    add_precision_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--lesion-labels", type=label_list, help="comma-separated label values counted as lesion (default: any > 0)")
    p.add_argument("--resample-to", action="store_true", help="resample sequences/masks onto the first sequence's grid")
    add_scan_options(p)
    p.add_argument("--overwrite", action="store_true")

    p = add("compare", cmd_compare, "What changed between baseline and follow-up: new, enlarged, stable, shrinking and resolved lesions.")
    p.add_argument("--baseline-lesions", required=True, help="baseline lesion mask (any label > 0)")
    p.add_argument("--followup-lesions", required=True, help="follow-up lesion mask")
    p.add_argument("--baseline-image", help="baseline image (e.g. FLAIR) to register the follow-up onto")
    p.add_argument("--followup-image", help="follow-up image of the same sequence")
    p.add_argument("--baseline-organ", help="organ mask on the baseline grid: registration looks only inside it; 'brain' for head "
                   "scans: the automatic brain mask (deepbet on skull-on scans, which are also bias-corrected first)")
    p.add_argument("--bspline", action="store_true", help="add a B-spline stage after rigid and affine")
    p.add_argument("--relative-change", type=float, default=0.5, help="enlarged/shrinking: relative volume change at least this (default 0.5)")
    p.add_argument("--min-change-mm3", type=float, default=10.0, help="... and an absolute change at least this (default 10 mm3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the registration's metric sampling")
    p.add_argument("--out", required=True, help="output folder: changes.csv, changes.json, followup_lesions_on_baseline.nii.gz")
    p.add_argument("--overwrite", action="store_true")

    p = add("experiment", cmd_experiment, "The paper's experiments on a cohort: base vs fine-tuned follow-ups along each axis, with references.")
    p.add_argument("--model", required=True, help="base model file, or a preset name for its shipped base model")
    p.add_argument("--cohort", required=True, help="cohort CSV (patient, visit, sequences, lesions[, organ]), a folder of patient/{baseline,followup}, or the brain_tumor_progression folder")
    p.add_argument("--out", required=True, help="output folder: results.csv (resumable), summary.md")
    p.add_argument("--arms", help="comma-separated subset of the arms (default: all)")
    p.add_argument("--iterations-axis", type=count_at_least(1), nargs="+", default=[50, 100, 500, 1000], help="fine-tuning iterations compared (default 50 100 500 1000)")
    p.add_argument("--default-iterations", type=count_at_least(1), default=100, help="iterations of the slice, weighting and naive arms (paper: 100)")
    p.add_argument("--mc-samples", type=mc_sample_count, default=0, help="MC-dropout samples for the uncertainty numbers (0 = off; else at least 2)")
    p.add_argument("--mc-arms", help="comma-separated arms that get the MC samples (default: base and ft-iter<default-iterations>)")
    p.add_argument("--workers", type=count_at_least(1), default=1, help="patients run in parallel processes")
    p.add_argument("--seed", type=int, default=0)

    p = add("evaluate", cmd_evaluate, "Dice, AVD, HD95 and lesion-wise metrics of predictions against ground truth.")
    p.add_argument("--pred", help="predicted label image")
    p.add_argument("--gt", help="ground-truth label image")
    p.add_argument("--pairs", help="CSV with columns case,pred,gt (paths relative to the CSV)")
    p.add_argument("--out", help="write per-case metrics CSV here")
    p.add_argument("--compare-to", help="per-case metrics CSV of another method (from --out): paired tests by case")
    p.add_argument("--overwrite", action="store_true")

    p = add("info", cmd_info, "Show a model file's metadata (after verifying it).")
    p.add_argument("model", help="model file, or a shipped preset name (brain-wmh, brain-tumor, liver-metastases)")
    p.add_argument("--card", action="store_true", help="print the model card (Markdown) instead of the metadata")

    p = add("report", cmd_report, "One self-contained HTML report for a patient from the outputs of segment, compare and finetune.")
    p.add_argument("--followup-image", required=True, help="the follow-up image the results are on (e.g. its FLAIR), for the figures")
    p.add_argument("--results", nargs="+", required=True, metavar="LABEL=FOLDER", help="segment output folders, e.g. base=seg/ fine-tuned=seg-ft/")
    p.add_argument("--model", help="the patient model file (provenance and the never-worse check's outcome)")
    p.add_argument("--changes", help="a compare output folder (change table, lesion load over time)")
    p.add_argument("--suggestions", help="suggestions.json of the baseline (segment --suggest)")
    p.add_argument("--truth", help="a reference lesion mask on the follow-up grid, drawn beside the results")
    p.add_argument("--title", default="Patient report")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--overwrite", action="store_true")

    p = add("demo", cmd_demo, "The whole workflow on a synthetic patient: suggest, fine-tune, segment the follow-up with uncertainty.")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--model", default="brain-wmh", help="base model file (default: the shipped brain-wmh model)")
    p.add_argument("--iterations", type=count_at_least(1), default=100, help="fine-tuning iterations")
    p.add_argument("--mc-samples", type=mc_sample_count, default=25)
    p.add_argument("--seed", type=int, default=0, help="seed of the generated patient, the fine-tuning and the MC masks")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")

    p = add("web", cmd_web, "Serve the workflow as a web app (trame-slicer; needs the web extra).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model", default="brain-wmh", help="base model file or shipped preset name")
    p.add_argument("--work", default=".", help="folder for the generated sample patient")
    p.add_argument("--data", help="the folder whose image files the page may load (default: --work); nothing outside it is read")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another name the app answers to, e.g. the one a reverse proxy forwards (repeat for each); "
                        "requests for any other Host or from any other Origin are refused")
    p.add_argument("--device", default="auto")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    _Parser.json_errors = _json_requested(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    from .images import ImageError
    from .modelfile import ModelFileError
    from .runtime import Cancelled, keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()

    # In JSON mode stdout carries events only: what the verbs print for people goes to stderr.
    events = sys.stdout
    if args.progress == "json":
        sys.stdout = sys.stderr
        send_events_to(events)
    # A terminated job (Cancel in the Slicer module) unwinds like Ctrl-C, so the atomic
    # writers remove their partial files before the process ends.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "pthread_sigmask"):
        # a launcher that blocks these signals passes its mask on to us: Cancel must still reach us
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        args.func(args)
    except KeyboardInterrupt:
        return _cancelled(args, "cancelled; no partial output was left behind")
    except Cancelled as exc:
        return _cancelled(args, f"cancelled: {exc}")
    except BrokenPipeError:
        # The program reading stdout stopped reading (``| head -1``): no event can reach it,
        # and Python's own flush at exit would fail again without the redirection.
        os.dup2(os.open(os.devnull, os.O_WRONLY), events.fileno())
        return _fail(args, "the program reading this command's output closed it before the end; the run was stopped", events=False)
    except (ImageError, ModelFileError, OSError, ValueError, RuntimeError) as exc:
        return _fail(args, _one_line(exc))
    except Exception as exc:  # a defect of ours: a program reading events still gets its error event; people get the traceback
        if args.progress == "json":
            emit("error", message=f"patient-finetune {args.command}: internal error: {type(exc).__name__}: {exc} (please report it)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdout = events
        send_events_to(None)
    return 0


def _cancelled(args, message: str) -> int:
    """Say that the verb was cancelled (stderr; a final ``cancelled`` event in JSON mode);
    returns the exit status, 130."""
    if args.progress == "json":
        emit("cancelled", message=message)
    print(message, file=sys.stderr)
    return 130


def _fail(args, text: str, events: bool = True) -> int:
    """Say why the verb failed, in one line on stderr and (``--progress json``) as an
    ``error`` event; returns the exit status, 2."""
    message = f"patient-finetune {args.command}: error: {text}"
    if events and args.progress == "json":
        emit("error", message=message)
    print(message, file=sys.stderr)
    return 2


def _one_line(exc: Exception) -> str:
    """The message of a failure: ours as it is; the operating system's (a folder given as
    a file, no permission) with the path it is about."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
