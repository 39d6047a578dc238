"""Long, resumable base training on anatomy synthesis (real label maps, random contrast),
scored as it goes on real scans it never sees.

    python Resources/Models/train_anatomy.py --preset brain-wmh --iterations 20000 \
        --width 32 --hours 2.5 [--threads 1]

Run it in the background (``nohup ... &``); run the same command again, in this session or
on another machine, to continue: it resumes from the committed checkpoint
``Resources/Models/training/<preset>-anatomy.checkpoint.pt`` (one file, replaced atomically
every ``--checkpoint-every`` iterations, so a kill at any moment loses at most that much).
``--hours`` stops it cleanly after that much wall time, checkpointing the iteration it
reached.

Every ``--validate-every`` iterations the model segments the real held-out scans (the three
Ljubljana MS scans for brain-wmh: none of them trains, so every real number is held out)
with FLAIR + T1 and with FLAIR alone; each score goes as one JSON line to
``training/<preset>-anatomy.log.jsonl`` (the learning curve) with the wall time so far.
When ``--iterations`` are done the model is written to ``--out`` (never over a shipped
model).

``--hold-out CASES`` makes it a leave-out fold of a real-and-synthetic mixture: the
preset's other real validation scans train beside the synthesis (``--synthetic-fraction``
of the patches synthesised), the held-out scans alone are scored, and the run has files of
its own (``<preset>-anatomy-loo-<CASES>.*``, commas as ``+``). A patient's name holds out
all of its visits (``03``: Brain-Tumor-Progression 03 Pre and Post). ``--all-real`` trains
on every real scan beside the synthesis (the candidate to ship, once the folds have judged
the recipe); its validation numbers are then in-sample. ``--init-from`` starts such a run from another
run's checkpoint (e.g. the synthesis-only run's), recorded in the model's metadata.

``--finish``, given the run's command with ``--iterations`` where the run ended, drops the
optimiser state from its finished checkpoint (leaving a third of the size), so that the committed
checkpoints leave room for a GPU call's pack; the model, ``--export`` and ``--init-from``
need only the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data"

#: Real scans each preset is scored on while it trains (none of them trains: every number
#: is held out). Sets of ``Testing/benchmarks/eval_real_base_models.real_cases``.
VALIDATION = {
    "brain-wmh": ("ljubljana_ms_cross",),
    "brain-tumor": ("brats2015_subset", "brain_tumor_progression"),
}


def load_validation(preset, data: Path):
    """The preset's real validation cases, loaded as the real-data benchmark loads them."""
    sys.path.insert(0, str(HERE.parents[1] / "Testing" / "benchmarks"))
    from eval_real_base_models import load_real_case, real_cases

    specs = [s for s in real_cases(data) if s["set"] in VALIDATION[preset.name]]
    if not specs:
        raise SystemExit(f"no {' or '.join(VALIDATION[preset.name])} cases under {data}; is --data right?")
    return [load_real_case(spec, [c for _, c in preset.sequences])[0] for spec in specs]


def split_hold_out(cases: list, hold_out: str) -> tuple[list, list]:
    """(training cases, held-out cases) of a leave-out fold.

    ``hold_out`` is a comma-separated list of short case names (``patient07``,
    ``brats_2013_pat0005_1``) or patients: ``01`` holds out both visits ``01_Pre`` and
    ``01_Post``, so that no patient sits on both sides of a fold.
    """
    wanted = [name.strip() for name in hold_out.split(",") if name.strip()]

    def short(case) -> str:
        return case.name.rsplit("/", 1)[-1]

    def named(case, name: str) -> bool:
        return short(case) == name or short(case).startswith(name + "_")

    held = [c for c in cases if any(named(c, w) for w in wanted)]
    unknown = [w for w in wanted if not any(named(c, w) for c in cases)]
    if unknown or not held:
        raise SystemExit(
            f"no real scan named {', '.join(unknown) or hold_out!r}; the preset's are {', '.join(short(c) for c in cases)}"
        )
    return [c for c in cases if all(c is not h for h in held)], held


#: The width the committed runs have; a run of another width is named after it.
DEFAULT_WIDTH = 32
#: The share of synthesised patches in a mixture with real scans (--hold-out, --all-real).
DEFAULT_SYNTHETIC_FRACTION = 0.5


def run_name(
    preset: str,
    width: int,
    hold_out: str | None,
    all_real: bool,
    learning_rate: float | None,
    synthetic_fraction: float = DEFAULT_SYNTHETIC_FRACTION,
    weight_average_decay: float = 0.0,
) -> str:
    """The name of a run's files in ``training/`` (``<name>.checkpoint.pt``,
    ``<name>.log.jsonl``): what makes its weights differ from another run's, so that a run
    resumes only its own checkpoint (a width-16 run never loads a width-32 one, a mixture
    of another synthetic share never the default mixture's)."""
    mixed = hold_out or all_real
    return (
        f"{preset}-anatomy"
        + (f"-w{width}" if width != DEFAULT_WIDTH else "")
        + (f"-loo-{hold_out.replace(',', '+')}" if hold_out else "")
        + ("-all-real" if all_real else "")
        + (f"-lr{learning_rate:g}" if learning_rate is not None else "")
        + (f"-synthetic{synthetic_fraction:g}" if mixed and synthetic_fraction != DEFAULT_SYNTHETIC_FRACTION else "")
        + (f"-average{weight_average_decay:g}" if weight_average_decay else "")
    )


def finish_run(checkpoint: Path, iterations: int) -> None:
    """Drop the optimiser state of a run's checkpoint, refused unless the run stands at
    ``iterations`` (so a run still under way is never cut short by mistake)."""
    from PatientFineTuneLib.training import finish_checkpoint

    if not checkpoint.is_file():
        raise SystemExit(
            f"--finish: no checkpoint {checkpoint}; give the run's own --preset, --width, --hold-out or --all-real, "
            "and --learning-rate"
        )
    before = checkpoint.stat().st_size
    try:
        reached = finish_checkpoint(checkpoint, iterations)
    except ValueError as error:
        raise SystemExit(f"--finish: {error}; give --iterations where the run ended") from None
    print(
        f"finished {checkpoint.name} at {reached} iterations: {before / 1e6:.1f} -> {checkpoint.stat().st_size / 1e6:.1f} MB"
    )


def refuse_a_run_that_cannot_go_on(checkpoint: Path, payload: dict | None, config, model) -> None:
    """Stop, before any data loads and in one line, a command whose run has a checkpoint
    it cannot go on from (the library's check, with what to give instead)."""
    from PatientFineTuneLib.training import check_checkpoint_can_go_on

    if payload is None:
        return
    try:
        check_checkpoint_can_go_on(checkpoint, payload, config, model)
    except ValueError as error:
        raise SystemExit(
            f"{error} (here: give the run's own options, or start a run of another name, with another --folder "
            f"or --learning-rate, and --init-from {checkpoint})"
        ) from None


def anatomy_model_metadata(model, preset, config, synthetic, iterations: int, **training) -> dict:
    """The metadata of a model trained on anatomy synthesis (and real scans): the sequences
    after the first are optional when sequence dropout trained it to do without them; the
    command, the settings, the iterations and the synthesis are recorded, with ``training``."""
    from PatientFineTuneLib.modelfile import make_metadata

    sequences = [
        {**s, "optional": i > 0 and config.sequence_dropout > 0} for i, s in enumerate(preset.sequence_dicts())
    ]
    return make_metadata(
        model,
        sequences,
        preset.training_spacing_mm,
        preset=preset.name,
        training={
            "command": " ".join(["python", f"Resources/Models/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
            "config": config.identity() | {"iterations": iterations},
            "anatomy_synthesis": synthetic.describe(),
            **training,
        },
    )


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked before torch loads (so a refusal is instant)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="brain-wmh", choices=sorted(VALIDATION))
    parser.add_argument("--maps", type=Path, default=DEFAULT_DATA / "synthseg_label_maps")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--iterations", type=int, default=20_000, help="total iterations of the run (a resumed run continues to this)"
    )
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "amp"],
        help="auto: the precision of the run's checkpoint where it has one; for a new run, bfloat16 autocast on a "
        "CPU with AMX tiles, float32 on other CPUs (bfloat16 is emulated there, many times slower), float16 "
        "autocast on a GPU; the resolved choice is part of the run's settings",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Adam's learning rate (default: TrainingConfig's); another one names the run's files after it, "
        "e.g. a late phase at a lower rate started with --init-from",
    )
    parser.add_argument(
        "--sequence-dropout", type=float, default=0.2, help="probability of blanking every sequence after the first"
    )
    parser.add_argument(
        "--weight-average-decay",
        type=float,
        default=0.0,
        help="keep an exponential moving average of the weights with this decay (e.g. 0.995: about the last 200 "
        "steps), validate and export it (default 0: none); a nonzero decay names the run's files after it",
    )
    parser.add_argument("--volume-every", type=int, default=4, help="iterations between new synthetic volumes")
    parser.add_argument("--checkpoint-every", type=int, default=300)
    parser.add_argument("--validate-every", type=int, default=1000)
    parser.add_argument("--hours", type=float, default=None, help="stop cleanly after this much wall time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="finished model (default training/<preset>-anatomy.pt)")
    parser.add_argument(
        "--hold-out",
        metavar="CASE",
        help="leave-out fold: train on the preset's real validation scans except these (comma-separated, e.g. "
        "patient07, or brats_2013_pat0005_1,03 where 03 is both visits of that patient) mixed with the synthesis, "
        "and score on them alone",
    )
    parser.add_argument(
        "--all-real",
        action="store_true",
        help="train on every real validation scan beside the synthesis, holding none out: the model to ship once the "
        "leave-out folds have judged the recipe (its validation numbers are in-sample; files <preset>-anatomy-all-real.*)",
    )
    parser.add_argument(
        "--synthetic-fraction",
        type=float,
        default=DEFAULT_SYNTHETIC_FRACTION,
        help="with --hold-out or --all-real: the share of synthesised patches (another share names the run's files after it)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="start from this checkpoint's model when the run has no checkpoint of its own yet",
    )
    parser.add_argument("--folder", type=Path, default=HERE / "training", help="where the checkpoint and the curve go")
    parser.add_argument(
        "--export",
        action="store_true",
        help="only write the model of the latest checkpoint to --out (to evaluate a run in progress)",
    )
    parser.add_argument(
        "--finish",
        action="store_true",
        help="the run is done at --iterations: drop its checkpoint's optimiser state (two thirds of the file)",
    )
    args = parser.parse_args(argv)
    if args.hold_out and args.all_real:
        parser.error("--all-real trains on every real scan; it cannot also hold some out (--hold-out)")
    if not 0.0 <= args.weight_average_decay < 1.0:
        parser.error("--weight-average-decay must be at least 0 and below 1 (0: no average; 0.995: about 200 steps)")
    if args.finish and (args.export or args.init_from):
        parser.error("--finish only rewrites the run's checkpoint; give it without --export and --init-from")
    return args


def training_config(args: argparse.Namespace, n_channels: int, device, checkpoint_payload: dict | None = None):
    """The run's :class:`~PatientFineTuneLib.training.TrainingConfig`.

    ``--precision auto`` becomes the precision of the run's checkpoint
    (``checkpoint_payload``) where it has one, so the same command goes on with a run on
    any machine; a new run gets bfloat16 autocast on a CPU with AMX tiles, float32 on other
    CPUs (where bfloat16 is emulated, many times slower) and float16 autocast on a GPU (as
    this script always did there; the library's ``resolved_precision`` keeps float32 on a
    GPU until one is measured).
    """
    import torch

    from PatientFineTuneLib.training import TrainingConfig
    from PatientFineTuneLib.training_loop import resolved_precision

    precision = args.precision
    if precision == "auto" and checkpoint_payload is not None:
        precision = json.loads(checkpoint_payload["config_json"])["precision"]
    elif precision == "auto":
        precision = resolved_precision("auto", device) if torch.device(device).type == "cpu" else "amp"
    return TrainingConfig(
        iterations=args.iterations,
        seed=args.seed,
        precision=precision,
        **({"learning_rate": args.learning_rate} if args.learning_rate is not None else {}),
        synthetic_fraction=args.synthetic_fraction if args.hold_out or args.all_real else 0.0,
        sequence_dropout=args.sequence_dropout,
        droppable_channels=tuple(range(1, n_channels)),
        weight_average_decay=args.weight_average_decay,
    )


def main(argv=None) -> None:
    args = parse_args(argv)

    import torch

    from PatientFineTuneLib.images import with_absent_sequences
    from PatientFineTuneLib.model import LesionNet
    from PatientFineTuneLib.modelfile import ModelBundle, save_model
    from PatientFineTuneLib.presets import get_preset
    from PatientFineTuneLib.runtime import Cancelled, resolve_device
    from PatientFineTuneLib.synth.anatomy import SYNTHESIS_VERSION
    from PatientFineTuneLib.synth.anatomy_patches import AnatomyPatches, settings_for_preset
    from PatientFineTuneLib.training import checkpoint_weights, train_base_model, validation_scores

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    folder = args.folder
    folder.mkdir(parents=True, exist_ok=True)
    run = run_name(
        preset.name,
        args.width,
        args.hold_out,
        args.all_real,
        args.learning_rate,
        args.synthetic_fraction,
        args.weight_average_decay,
    )
    checkpoint = folder / f"{run}.checkpoint.pt"
    curve = folder / f"{run}.log.jsonl"
    if args.finish:
        finish_run(checkpoint, args.iterations)
        return
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True) if checkpoint.is_file() else None
    if args.export and payload is None:
        raise SystemExit(f"--export: no checkpoint {checkpoint}; give the run's own options")
    n_channels = sum(c for _, c in preset.sequences)
    device = resolve_device(args.device)
    config = training_config(args, n_channels, device, payload)
    torch.manual_seed(args.seed)
    model = LesionNet([c for _, c in preset.sequences], width=args.width)
    # an export is checked too (for settings only): its model card records them as the run's
    refuse_a_run_that_cannot_go_on(
        checkpoint, payload, dataclasses.replace(config, iterations=0) if args.export else config, model
    )
    out = args.out or folder / f"{run}.pt"
    maps = sorted(args.maps.glob("*.nii*"))
    if not maps:
        raise SystemExit(f"no label maps (*.nii, *.nii.gz) in {args.maps}; give --maps the synthseg_label_maps folder")
    synthetic = AnatomyPatches(maps, settings_for_preset(preset), seed=args.seed, volume_every=args.volume_every)
    if args.init_from and not checkpoint.exists():
        model.load_state_dict(checkpoint_weights(torch.load(args.init_from, map_location="cpu", weights_only=True)))
    real_cases = []  # the real scans that train beside the synthesis (--hold-out)

    def write_model(iterations: int, final_loss, wall_s: float) -> None:
        metadata = anatomy_model_metadata(
            model,
            preset,
            config,
            synthetic,
            iterations,
            train_cases=[c.name for c in real_cases],
            held_out_sets=[args.hold_out] if args.hold_out else [] if args.all_real else list(VALIDATION[preset.name]),
            **({"initialised_from": str(args.init_from)} if args.init_from else {}),
            final_loss=final_loss,
            wall_time_s=round(wall_s, 1),
        )
        save_model(ModelBundle(model, metadata), out, overwrite=True)
        print(f"saved {out} ({iterations} iterations)")

    val_cases = load_validation(preset, args.data)
    if args.hold_out:
        real_cases, val_cases = split_hold_out(val_cases, args.hold_out)
    elif args.all_real:  # nothing is held out: its validation scores the scans it trains on
        real_cases = list(val_cases)
    if args.export:  # after the split, so a fold's model names the real scans it trained on
        model.load_state_dict(checkpoint_weights(payload))
        lines = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()] if curve.exists() else []
        write_model(int(payload["iteration"]), None, max((r.get("wall_s", 0.0) for r in lines), default=0.0))
        return
    # the scans as a model trained with sequence dropout sees them without the later sequences
    first_only = (
        [
            with_absent_sequences(
                dataclasses.replace(c, images=c.images[:1], name=c.name + " (first sequence only)"), n_channels
            )
            for c in val_cases
        ]
        if n_channels > 1
        else []
    )
    started = time.monotonic()
    previous = 0.0
    if curve.exists():
        lines = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
        previous = max((r.get("wall_s", 0.0) for r in lines), default=0.0)

    def record(entry: dict) -> None:
        entry = dict(entry)
        if first_only:
            alone = validation_scores(model, first_only, preset.training_spacing_mm, device, preset.name)
            entry["val_dice_first_sequence_only"], entry["val_lesion_f1_first_sequence_only"] = (
                alone["dice"],
                alone["lesion_f1"],
            )
            model.train()
        entry["wall_s"] = round(previous + time.monotonic() - started, 1)
        entry["width"] = args.width
        entry["synthesis_version"] = SYNTHESIS_VERSION
        with curve.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    deadline = None if args.hours is None else started + 3600 * args.hours
    try:
        history = train_base_model(
            model,
            real_cases,
            preset.training_spacing_mm,
            config,
            val_cases=val_cases,
            device=device,
            checkpoint_path=checkpoint,
            checkpoint_every=args.checkpoint_every,
            validate_every=args.validate_every,
            resume=checkpoint.exists(),
            preset=preset.name,
            synthetic=synthetic,
            on_validation=record,
            cancel=(lambda: time.monotonic() > deadline) if deadline else None,
        )
    except Cancelled:
        print(
            f"stopped after {args.hours} h; the checkpoint {checkpoint} holds the iteration it reached; "
            "run the same command to continue",
            flush=True,
        )
        return
    write_model(config.iterations, history[-1]["loss"] if history else None, previous + time.monotonic() - started)


if __name__ == "__main__":
    main()
