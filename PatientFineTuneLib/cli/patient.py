"""The verbs of one patient's workflow: ``segment`` (with ``--suggest``), ``suggest`` and
``finetune``; the Slicer module and the web app run them as jobs (:mod:`..workflow`)."""

from __future__ import annotations

import argparse
import json

from ..files import check_output_folder, refuse_existing, refuse_inputs_as_outputs
from ..modelcard import resolve_model_path
from .common import (
    add_case_options,
    add_precision_option,
    add_verb,
    case_for_model,
    case_inputs,
    count_at_least,
    derived_model_paths,
    fraction,
    mc_sample_count,
    report_device,
    report_result,
    step,
    train_and_save,
)


def register(sub) -> None:
    p = add_verb(sub, "segment", cmd_segment, "Segment lesions in one case with a model file.")
    add_case_options(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument(
        "--opening",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-slice plus opening (default: from the model's preset)",
    )
    p.add_argument(
        "--min-lesion-voxels",
        type=count_at_least(1),
        default=None,
        metavar="N",
        help="drop lesions of fewer than N voxels (default: from the model's preset: 2 for brain, 1 keeps every lesion)",
    )
    p.add_argument(
        "--mc-samples",
        type=mc_sample_count,
        default=0,
        help="MC-dropout samples for the uncertainty map (paper: 25; 0 = off; else at least 2)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout masks")
    p.add_argument(
        "--suggest",
        type=count_at_least(0),
        default=0,
        metavar="K",
        help="also write suggestions.json: the K slices worth annotating first, from the same pass (0 = off)",
    )
    p.add_argument("--overwrite", action="store_true")

    p = add_verb(
        sub, "suggest", cmd_suggest, "Rank baseline slices to annotate: mean lesion softmax closest to 0.5 first."
    )
    add_case_options(p, lesions=True)
    p.add_argument("-k", type=count_at_least(0), default=2, help="how many slices (0 = all, ranked)")
    p.add_argument(
        "--candidates",
        choices=["organ", "lesion"],
        default="organ",
        help="all organ slices, or only annotated lesion slices",
    )
    p.add_argument("--ranking", choices=["softmax", "entropy"], default="softmax")

    p = add_verb(
        sub,
        "finetune",
        cmd_finetune,
        "Fine-tune a base model (its last two layers; every layer where many slices are annotated) on a patient's annotated baseline.",
    )
    add_case_options(p, lesions=True)
    p.add_argument("--out", required=True, help="patient model file to write (never the base model)")
    p.add_argument(
        "--slices",
        default="all-lesion",
        help="all-lesion (default), all-organ, suggested:K, suggested-lesion:K, or indices like 12,20",
    )
    p.add_argument("--iterations", type=count_at_least(1), default=100)
    p.add_argument(
        "--check-iterations",
        type=count_at_least(1),
        nargs="+",
        metavar="N",
        help="iteration counts the never-worse check compares on the held-out part; the patient model trains the best "
        "(default: 1, 2 and 4 times --iterations where the head trains; where each fold would hold out at least 3 whole "
        "slices every layer trains, at twice the learning rate on one fold, comparing 1/2, 1 and 2 times --iterations, and the "
        "patient model continues that fold's model for half the chosen count; "
        "counts above --iterations replace it, where it does not help, only by a clear margin)",
    )
    p.add_argument(
        "--hard-negatives",
        type=count_at_least(0),
        metavar="K",
        help="with --slices all-lesion: also train on the K lesion-free slices where the base model finds the most lesion "
        "(default: the preset's, 6 for brain-tumor, 0 otherwise)",
    )
    p.add_argument(
        "--weighting",
        choices=["preset", "none", "segmentation", "detection"],
        default="preset",
        help="pixel weighting of the loss (preset: the task's default, segmentation for brain-wmh, none for brain-tumor, "
        "detection for liver-metastases; none for a 3D U-Net)",
    )
    # the reference implementations, for the equivalence tests and benchmarks, not for users
    p.add_argument("--angles", type=count_at_least(0), help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["auto", "fast", "naive"], help=argparse.SUPPRESS)
    p.add_argument(
        "--pixel-fraction",
        type=fraction,
        help="the head runs, and the loss is taken, on this random fraction of each patch's pixels per iteration "
        "(default 0.25: 3x faster where the head trains, 1.7x where every layer does, the same decisions on the "
        "real scans; 1 = exact, the paper)",
    )
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        help="never worse than the base model (default): fine-tune on each half of the annotation in turn and keep the base "
        "model unless that beats it on the other half (about three times the head's training time; 2D network only)",
    )
    p.add_argument(
        "--layers",
        choices=["head", "all", "decoder", "last-layers"],
        help="head: the last two layers (the paper); all: every layer (Kaur et al. 2019's FT_All; slower); "
        "3D U-Net only: decoder, last-layers (default: the head, and every layer where the never-worse check holds out "
        "at least 3 whole slices in each fold, i.e. about 6 or more annotated lesion slices)",
    )
    add_precision_option(
        p,
        default=None,
        default_help="fp32 for the head; where every layer trains, bfloat16 on a CPU with AMX and fp32 elsewhere",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def cmd_segment(args) -> None:
    from ..inference import segment_case
    from ..modelfile import load_model
    from ..outputs import SEGMENT_FILES, write_segment_outputs

    out = check_output_folder(args.out)
    model = resolve_model_path(args.model)
    bundle = load_model(model)
    outputs = {role: out / name for role, name in SEGMENT_FILES.items()}
    case, organ = case_for_model(args, bundle)
    refuse_inputs_as_outputs(case_inputs(case, model), outputs.values())
    produced = {"segmentation", "labels", "probability", "table"} | ({"organ"} if organ is None else set())
    produced |= ({"uncertainty", "summary"} if args.mc_samples else set()) | (
        {"suggestions"} if args.suggest else set()
    )
    refuse_existing([outputs[k] for k in produced], args.overwrite)
    report_device(args, args.device)
    with step(args, "segment", unit="slice") as progress:
        result = segment_case(
            bundle,
            case,
            opening=args.opening,
            threshold=args.threshold,
            min_lesion_voxels=args.min_lesion_voxels,
            mc_samples=args.mc_samples,
            seed=args.seed,
            device=args.device,
            progress=progress.update,
        )
    suggestions = None
    if args.suggest:
        from ..suggest import suggest_slices

        suggestions = [
            s.as_dict() for s in suggest_slices(bundle, case, k=args.suggest, probability=result.probability)
        ]
    written = write_segment_outputs(
        case,
        result,
        out,
        overwrite=args.overwrite,
        organ=organ is None,
        suggestions=suggestions,
        mc_samples=args.mc_samples,
        seed=args.seed,
    )
    volume = sum(r["volume_mm3"] for r in result.lesions) / 1000
    print(f"{len(result.lesions)} lesion(s), {volume:.2f} mL; outputs in {out}")
    if result.uncertainty is not None:
        print(
            f"uncertainty ({args.mc_samples} MC-dropout samples): max SD {result.summary['max_sd']:.3f}, "
            f"mean SD in lesions {result.summary['mean_sd_in_lesions']:.3f}"
        )
    if suggestions:
        print("suggested slices: " + ", ".join(str(s["slice"]) for s in suggestions))
    report_result(args, "segment", written, lesions=len(result.lesions), volume_ml=volume)


def cmd_suggest(args) -> None:
    from ..modelfile import load_model
    from ..suggest import suggest_slices

    bundle = load_model(resolve_model_path(args.model))
    case, _ = case_for_model(args, bundle, lesions=args.candidates == "lesion")
    suggestions = [
        s.as_dict()
        for s in suggest_slices(
            bundle, case, k=args.k, candidates=args.candidates, ranking=args.ranking, device=args.device
        )
    ]
    print(json.dumps(suggestions, indent=2))
    report_result(args, "suggest", {}, suggestions=suggestions)


def finetune_settings(args) -> dict:
    """The settings the user chose, as :func:`~..finetune.shipped_config` overrides (the
    ones left out keep the shipped defaults)."""
    chosen = {
        "method": args.method,
        "n_angles": args.angles,
        "layers": args.layers,
        "holdout_iterations": tuple(args.check_iterations) if args.check_iterations else None,
        "hard_negative_slices": args.hard_negatives,
        "pixel_fraction": args.pixel_fraction,
        "precision": args.precision,
    }
    if args.weighting != "preset":
        chosen["weighting"] = None if args.weighting == "none" else args.weighting
    return {name: value for name, value in chosen.items() if value is not None or name == "weighting"}


def _refuse_2d_options(args) -> None:
    """Refuse, before any work, the finetune options that only the 2D network has (a 3D
    U-Net would ignore them silently)."""
    given = [
        option
        for option, value in (
            ("--method", args.method),
            ("--angles", args.angles),
            ("--hard-negatives", args.hard_negatives),
            ("--check", args.check),
            ("--pixel-fraction", args.pixel_fraction),
            ("--check-iterations", args.check_iterations),
        )
        if value is not None and value is not False
    ]  # --no-check agrees with a 3D U-Net; --angles 0 does not
    if given:
        raise ValueError(
            f"{', '.join(given)} applies to the 2D network only; this 3D U-Net fine-tunes on whole volumes without it "
            "(no fixed angles, hard negatives or never-worse check): leave it out"
        )


def cmd_finetune(args) -> None:
    from ..finetune import finetune_patient_model, shipped_config
    from ..modelcard import describe_patient_model
    from ..modelfile import load_model

    out, model = derived_model_paths(args, "base")
    bundle = load_model(model)
    if bundle.is_volume_model:
        _refuse_2d_options(args)
    case, _ = case_for_model(args, bundle, lesions=True)
    refuse_inputs_as_outputs(case_inputs(case, model), [out])
    check = args.check is not False and not bundle.is_volume_model  # the check holds out 2D slice blocks
    report_device(args, args.device)
    config = shipped_config(
        bundle,
        iterations=args.iterations,
        seed=args.seed,
        holdout_check=check,
        **finetune_settings(args),
    )
    info, sha = train_and_save(
        args,
        "finetune",
        config.progress_total(),
        lambda progress: finetune_patient_model(
            bundle,
            case,
            args.slices,
            config,
            device=args.device,
            progress=progress.training_callback(),
            phase=progress.phase,
        ),
        out,
    )
    description = describe_patient_model(info)
    print(f"{description} ({info['wall_time_s']} s); saved {out} (sha256 {sha[:16]}...)")
    report_result(
        args,
        "finetune",
        {"model": out},
        sha256=sha,
        description=description,
        base_model_kept=not info.get("holdout_check", {}).get("kept", True),
    )
