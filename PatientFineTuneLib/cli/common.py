"""What the verbs share: progress and events in this invocation's ``--progress`` mode, the
argparse value types, the option groups several verbs take (defined once), and turning
those options into the library's arguments."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..files import check_output_file, refuse_existing
from ..modelcard import resolve_model_path  # torch-free: the command line starts fast
from ..progress import StepProgress, emit

# ---------------------------------------------------------------------------------------
# progress, notes and the machine-readable lines


def step(args, name: str, total: int | None = None, unit: str = "it") -> StepProgress:
    """Progress of one step in this invocation's ``--progress`` mode."""
    return StepProgress(args.progress, name, total, unit)


def note(args, text: str) -> None:
    """What the command did to the inputs that the user should know: a ``note`` event with
    ``--progress json`` (the Slicer module and jobs show it), else a line on stderr (suggest
    prints its result as JSON on stdout)."""
    if args.progress == "json":
        emit("note", text=text)
    else:
        print(text, file=sys.stderr)


def report_device(args, device) -> None:
    """The machine-readable line of what runs the network (``--progress json`` only)."""
    if args.progress == "json":
        from ..runtime import describe_device

        emit("device", description=describe_device(device))


def report_result(args, verb: str, outputs: dict, **fields) -> None:
    """The machine-readable line of what a verb wrote (``--progress json`` only)."""
    if args.progress == "json":
        emit("result", verb=verb, outputs={k: str(v) for k, v in outputs.items()}, **fields)


def command_line() -> str:
    """This invocation, as it would be typed (recorded in model files)."""
    return "patient-finetune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# ---------------------------------------------------------------------------------------
# argparse value types


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
        raise argparse.ArgumentTypeError(
            "invalid value 1: use 0 for no uncertainty map, or at least 2 samples (the paper: 25)"
        )
    return value


def label_list(text: str) -> list[int]:
    """argparse type of --lesion-labels: comma-separated whole numbers."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected comma-separated whole numbers such as 1,2"
        ) from None


# ---------------------------------------------------------------------------------------
# option groups


def add_scan_options(parser) -> None:
    """How scans are read: --skull-stripped, --bias-correction, --resample-to."""
    # the choices of brainmask.SKULL_STRIPPED_CHOICES and BIAS_CORRECTION_CHOICES, spelled
    # out so that --help does not import SimpleITK and scipy (load_case checks them)
    group = parser.add_argument_group("reading the scans")
    group.add_argument(
        "--skull-stripped",
        choices=("auto", "yes", "no"),
        default="auto",
        help="brain presets without --organ: is the scan skull-stripped? auto detects it; a skull-on scan is masked by deepbet",
    )
    group.add_argument(
        "--bias-correction",
        choices=("auto", "on", "off"),
        default="auto",
        help="N4 bias-field correction inside the brain mask (auto: for skull-on scans without --organ)",
    )
    group.add_argument(
        "--resample-to",
        action="store_true",
        help="resample every other sequence and the masks onto the first sequence's grid",
    )


def add_training_data_options(parser, what: str) -> None:
    """The annotated cases a verb trains on: --train, --lesion-labels and the scan options."""
    parser.add_argument("--train", required=True, help=f"folder of {what} or CSV manifest (with lesion masks)")
    parser.add_argument(
        "--lesion-labels", type=label_list, help="comma-separated label values counted as lesion (default: any > 0)"
    )
    add_scan_options(parser)


def add_case_options(parser, lesions: bool = False) -> None:
    """One patient's scan for a model: --model, --case or --images, --organ, (--lesions),
    --series-uid, --device and the scan options."""
    parser.add_argument("--model", required=True, help="model file, or a preset name for its shipped base model")
    parser.add_argument("--case", help="case folder with one file per sequence (FLAIR.nii.gz, ...)")
    parser.add_argument("--images", nargs="+", help="sequence files in the model's order (instead of --case)")
    parser.add_argument("--organ", help="organ mask (default: organ.* in the case folder, else automatic brain mask)")
    if lesions:
        parser.add_argument("--lesions", help="baseline annotation (default: lesions.* in the case folder)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    add_scan_options(parser)
    parser.add_argument(
        "--series-uid",
        action="append",
        default=[],
        metavar="UID",
        help="for an image folder holding several DICOM series: the one to read (repeat it for each such folder, in the order of the images)",
    )


def add_precision_option(parser, default: str | None = "fp32", default_help: str = "fp32") -> None:
    # training_loop.PRECISIONS less "auto", spelled out so that --help does not import torch
    parser.add_argument(
        "--precision",
        choices=("fp32", "amp"),
        default=default,
        help=f"amp: mixed precision (float16 on GPUs, bfloat16 on CPUs); default: {default_help}",
    )


# ---------------------------------------------------------------------------------------
# from options to the library's arguments


def scan_options(args):
    """The scan options of a verb as the library's :class:`~.caseload.ScanOptions`."""
    from ..caseload import ScanOptions

    labels = getattr(args, "lesion_labels", None)
    return ScanOptions(args.skull_stripped, args.bias_correction, args.resample_to, tuple(labels) if labels else None)


def case_for_model(args, bundle, lesions: bool = False):
    """The case named by --case/--images (+ --organ, --lesions) for ``bundle``, normalised,
    with its notes shown; returns (case, the organ mask given or None)."""
    from ..caseload import case_folder_files, describe_sequences, load_for_model
    from ..images import assign_series_uids

    if args.case and args.images:
        raise ValueError("give --case FOLDER or --images FILES, not both")
    if args.case:
        files = case_folder_files(args.case, bundle.sequences, lesions=lesions)
        paths, organ, lesion_path = (
            files.sequences,
            args.organ or files.organ,
            (getattr(args, "lesions", None) or files.lesions),
        )
    elif args.images:
        paths, organ, lesion_path = args.images, args.organ, getattr(args, "lesions", None)
    else:
        raise ValueError(
            f"give --case FOLDER or --images with the model's sequences in the order {describe_sequences(bundle.sequences)}"
        )
    if lesions and lesion_path is None:
        raise FileNotFoundError(
            "this needs the baseline annotation: --lesions FILE (or lesions.nii.gz in the --case folder)"
        )
    loaded = load_for_model(
        bundle.sequences,
        paths,
        organ,
        lesion_path if lesions else None,
        auto_organ=bundle.auto_organ_mask,
        options=scan_options(args),
        series_uids=assign_series_uids(paths, args.series_uid),
    )
    for text in loaded.notes:
        note(args, text)
    return loaded.case, organ


def case_inputs(case, model: Path) -> list:
    """The files a case was read from, and the model: no output may replace any of them."""
    sources = case.sources
    return [*sources["sequences"], sources.get("organ"), sources.get("lesions"), model]


def derived_model_paths(args, role: str) -> tuple[Path, Path]:
    """(--out, --model) of a verb that trains a new model from another; the other model
    (``role``: base, source) is never the output, and --out is not replaced silently."""
    out, model = check_output_file(args.out, suffix=".pt"), resolve_model_path(args.model)
    if out.resolve() == model.resolve():
        raise ValueError(f"--out is the {role} model file; the {role} model is never overwritten, choose another name")
    refuse_existing([out], args.overwrite)
    return out, model


def train_and_save(args, description: str, iterations: int, train, out: Path) -> tuple[dict, str]:
    """Run ``train(step) -> ModelBundle`` with progress reported on ``step`` (a
    :class:`StepProgress`), record its wall time and this command in its ``finetune``
    metadata and save it; returns (that record, sha256)."""
    from ..modelfile import save_model

    start = time.perf_counter()
    with step(args, description, iterations) as progress:
        trained = train(progress)
    info = trained.metadata["finetune"]
    info["wall_time_s"] = round(time.perf_counter() - start, 1)
    info["command"] = command_line()
    return info, save_model(trained, out, overwrite=args.overwrite)


def add_verb(sub, name: str, func, help_text: str) -> argparse.ArgumentParser:
    """A verb's subparser, its help also its description, running ``func(args)``."""
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(func=func)
    return parser
