"""Base training on a borrowed GPU: pack here, train there, score here.

A GPU is lent for short stretches (about 15 minutes of an H100): it has torch, numpy and
scipy but no SimpleITK, nibabel or network, and at most 64 MiB travel with the repository
(which itself takes 23 of them since its finished checkpoints lost their optimiser state). So everything training needs is packed on a machine that
reads images, into one file of under 60 MB, and the GPU trains from the pack alone:

    # here (CPU): the label maps and the real scans' training slices
    python Resources/Models/gpu_training.py pack --preset brain-wmh --out gpu_pack/brain-wmh.npz
    # there: train for the minutes given, at the paper's width, one leave-out fold
    python Resources/Models/gpu_training.py train --pack gpu_pack/brain-wmh.npz --minutes 3 \\
        --width 64 --hold-out patient07 --out $OUT
    # here again: score the weights on the held-out scan
    python Testing/benchmarks/eval_real_base_models.py --sets ljubljana_ms_cross \\
        --model brain-wmh=<out>/brain-wmh-gpu-loo-patient07.pt

``train`` is :func:`~PatientFineTuneLib.training.train_base_model` (the one training loop)
on :class:`~PatientFineTuneLib.synth.anatomy_patches.AnatomyPatches` of the packed maps,
mixed half and half with patches of the packed real scans except the held-out ones (as
``train_anatomy.py --hold-out`` does), with the synthesis drawn ahead in worker processes
so the GPU is not left waiting for one CPU core. It stops cleanly at ``--minutes`` and
writes, into ``--out``: the model (``<preset>-gpu[-loo-<CASES joined by ->].pt``, loadable with
``torch.load(weights_only=True)``), its checkpoint (to continue on another lent GPU with
``--resume``), and ``<...>.log.jsonl``: the loss every 50 iterations, iterations per
second, the device, and the timings of inference (a 240 x 240 slice stack) and of a
fine-tuning-sized step (batch 4 at the shipped width) on that device. Keep the weights
only if their held-out numbers beat the CPU model's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data"
PACK_FORMAT = "PatientFineTune-gpu-pack-1"
#: The issue's bound on a pack; what actually travels is the pack and the repository together,
#: within ``DEVICE_CARRY_MIB`` (``pack`` reports both).
MAX_PACK_MB = 60.0
DEVICE_CARRY_MIB = 64
#: The larger preset's pack as measured (brain-tumor: 22.8 MB, 21.74 MiB), rounded up, and
#: the room the tracked files must leave beside it so that the next run's checkpoints and
#: curves still travel.
LARGEST_PACK_MIB = 22.0
GROWTH_MARGIN_MIB = 8.0
#: AnatomyMap's fields, as packed.
MAP_FIELDS = ("codes", "names", "origin", "inverse", "brain_cells", "name")


def pack_arrays(preset, anatomy_maps, cases) -> dict[str, np.ndarray]:
    """The pack's arrays: each :class:`~PatientFineTuneLib.synth.anatomy.AnatomyMap`'s
    fields and the training slices of each normalised real case (float16 images, uint8
    masks, at ``preset``'s training spacing)."""
    from PatientFineTuneLib.synth.anatomy import SYNTHESIS_VERSION
    from PatientFineTuneLib.training import case_training_slices

    arrays = {
        "format": np.array(PACK_FORMAT),
        "preset": np.array(preset.name),
        "synthesis_version": np.array(SYNTHESIS_VERSION),
    }
    for m, anatomy in enumerate(anatomy_maps):
        for name in MAP_FIELDS:
            arrays[f"map{m}_{name}"] = np.asarray(getattr(anatomy, name))
    for c, case in enumerate(cases):
        slices = case_training_slices(case, preset.training_spacing_mm)
        arrays[f"case{c}_name"] = np.array(case.name)
        arrays[f"case{c}_images"] = np.stack([s[0].numpy() for s in slices]).astype(np.float16)
        arrays[f"case{c}_lesions"] = np.stack([s[1].numpy() for s in slices]).astype(np.uint8)
        arrays[f"case{c}_organ"] = np.stack([s[2].numpy() for s in slices]).astype(np.uint8)
    return arrays


def write_pack(arrays: dict[str, np.ndarray], out: Path, max_mb: float = MAX_PACK_MB) -> float:
    """Write the pack (compressed, atomically); returns its size in MB. Raises SystemExit,
    leaving no file, when it would exceed ``max_mb``."""
    from PatientFineTuneLib.files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        size_mb = Path(tmp).stat().st_size / 1e6
        if size_mb > max_mb:
            raise SystemExit(
                f"the pack would be {size_mb:.1f} MB, over {max_mb:g} MB; it cannot travel to a GPU machine"
            )

    atomic_write(out, write, overwrite=True)
    return out.stat().st_size / 1e6


def pack(preset_name: str, maps_folder: Path, data: Path, out: Path) -> dict:
    """Pack every label map of ``maps_folder`` and the preset's real scans under ``data``
    (as ``train_anatomy.py`` loads them); returns the pack's summary."""
    from PatientFineTuneLib.presets import get_preset
    from PatientFineTuneLib.synth.anatomy import load_anatomy_map

    sys.path.insert(0, str(HERE))
    from train_anatomy import load_validation

    preset = get_preset(preset_name)
    map_paths = sorted(maps_folder.glob("*.nii*"))
    if not map_paths:
        raise SystemExit(f"no label maps in {maps_folder}; pass --maps (the shared synthseg_label_maps)")
    cases = load_validation(preset, data)
    size_mb = write_pack(pack_arrays(preset, [load_anatomy_map(p) for p in map_paths], cases), out)
    summary = {"pack": str(out), "mb": round(size_mb, 1), "maps": len(map_paths), "cases": [c.name for c in cases]}
    pack_mib = size_mb * 1e6 / 2**20
    if pack_mib > LARGEST_PACK_MIB:
        print(
            f"warning: the pack is {pack_mib:.1f} MiB, larger than LARGEST_PACK_MIB "
            f"({LARGEST_PACK_MIB} MiB); raise it, so that the repository's size test keeps room for this pack",
            file=sys.stderr,
        )
    travels = repository_mib() + pack_mib
    summary["travels_with_the_repository_mib"] = round(travels, 1)
    if travels > DEVICE_CARRY_MIB:
        print(
            f"warning: the pack and the repository's files come to {travels:.1f} MiB, over the {DEVICE_CARRY_MIB} MiB "
            "a device call carries; leave out checkpoints that are no longer needed",
            file=sys.stderr,
        )
    return summary


def repository_mib() -> float:
    """MiB of the repository's tracked files (what a device call sends besides ``carry``)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, check=True, text=True).stdout

    root = Path(git("rev-parse", "--show-toplevel").strip())
    names = [n for n in git("ls-files", "-z", "--full-name", str(root)).split("\0") if n]
    return sum((root / n).stat().st_size for n in names if (root / n).is_file()) / 2**20


def read_pack(path: Path) -> SimpleNamespace:
    """The pack as ``preset``, ``maps`` (AnatomyMap list) and ``cases`` (``name`` and
    ``slices``: (image, lesion, organ) float tensors as :func:`case_training_slices`
    gives them). Reads no pickles."""
    import torch

    from PatientFineTuneLib.synth.anatomy import SYNTHESIS_VERSION, AnatomyMap

    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if str(arrays.get("format", "")) != PACK_FORMAT:
        raise SystemExit(f"{path} is not a {PACK_FORMAT} file; make it with `gpu_training.py pack`")
    if int(arrays["synthesis_version"]) != SYNTHESIS_VERSION:
        raise SystemExit(
            f"{path} was packed for synthesis version {int(arrays['synthesis_version'])}, this code is "
            f"version {SYNTHESIS_VERSION}; pack again"
        )
    maps = []
    for m in range(sum(k.endswith("_codes") for k in arrays)):
        fields = {name: arrays[f"map{m}_{name}"] for name in MAP_FIELDS}
        fields["names"] = tuple(str(n) for n in fields["names"])
        fields["name"] = str(fields["name"])
        maps.append(AnatomyMap(**fields))
    cases = []
    for c in range(sum(k.endswith("_images") for k in arrays)):
        images = torch.from_numpy(arrays[f"case{c}_images"].astype(np.float32))
        lesions = torch.from_numpy(arrays[f"case{c}_lesions"].astype(np.float32))
        organ = torch.from_numpy(arrays[f"case{c}_organ"].astype(np.float32))
        cases.append(SimpleNamespace(name=str(arrays[f"case{c}_name"]), slices=list(zip(images, lesions, organ))))
    return SimpleNamespace(preset=str(arrays["preset"]), maps=maps, cases=cases)


def device_timings(model, preset, device, slices: int = 155) -> dict:
    """Seconds, on ``device``: inference of a 240 x 240 stack of ``slices`` slices by ``model``,
    and one training step at batch 4 of a model of the shipped width (what fine-tuning
    iterates), each the median of 5 after a warm-up."""
    import torch

    from PatientFineTuneLib.inference import predict_logits
    from PatientFineTuneLib.model import LesionNet
    from PatientFineTuneLib.training_loop import Adam, training_loop

    def median_seconds(work) -> float:
        work()
        times = []
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            work()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    channels = [c for _, c in preset.sequences]
    stack = torch.randn(slices, sum(channels), 240, 240, device=device)
    model.eval()
    with torch.no_grad():
        inference_s = median_seconds(lambda: predict_logits(model, stack))
    # a fine-tuning-sized step, through the library's one training loop and optimiser
    shipped = LesionNet(channels, width=16).to(device).train()
    batch = torch.randn(4, sum(channels), 128, 128, device=device)
    target = torch.randint(0, 2, (4, 128, 128), device=device)
    stamps = []

    def loss_of(iteration: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(shipped(batch).float(), target)

    training_loop(
        loss_of,
        Adam(shipped.parameters(), lr=1e-4),
        range(7),
        seed=0,
        device=device,
        after_step=lambda done, loss: stamps.append(time.perf_counter()),  # the loss's .item() waits for the GPU
    )
    step_s = float(np.median(np.diff(stamps[1:])))  # the first step warms up
    return {
        f"inference_{slices}_slices_s": round(inference_s, 4),
        "finetune_step_batch4_width16_s": round(step_s, 5),
    }


def train(args) -> dict:
    """Train one fold from the pack for ``args.minutes``; returns the run's summary."""
    import torch

    from PatientFineTuneLib.model import LesionNet
    from PatientFineTuneLib.modelfile import ModelBundle, save_model
    from PatientFineTuneLib.presets import get_preset
    from PatientFineTuneLib.runtime import Cancelled, describe_device, resolve_device
    from PatientFineTuneLib.synth.anatomy_patches import AnatomyPatches, settings_for_preset
    from PatientFineTuneLib.training import TrainingConfig, pool_of_slices, train_base_model

    sys.path.insert(0, str(HERE))
    from train_anatomy import anatomy_model_metadata, split_hold_out

    if args.threads:
        torch.set_num_threads(args.threads)
    packed = read_pack(args.pack)
    preset = get_preset(packed.preset)
    real, held = split_hold_out(packed.cases, args.hold_out) if args.hold_out else (packed.cases, [])
    # only letters, digits, '.', '_' and '-' come back from a device call's $OUT: no '+'
    run = f"{preset.name}-gpu" + (f"-loo-{args.hold_out.replace(',', '-')}" if args.hold_out else "")
    args.out.mkdir(parents=True, exist_ok=True)
    model_path, log_path = args.out / f"{run}.pt", args.out / f"{run}.log.jsonl"
    checkpoint = (args.checkpoint_dir or args.out) / f"{run}.checkpoint.pt"
    n_channels = sum(c for _, c in preset.sequences)
    config = TrainingConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        seed=args.seed,
        precision="amp",
        channels_last=True,
        synthetic_fraction=0.5 if real else 1.0,
        sequence_dropout=args.sequence_dropout,
        droppable_channels=tuple(range(1, n_channels)),
    )
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = LesionNet([c for _, c in preset.sequences], width=args.width)
    synthetic = AnatomyPatches(packed.maps, settings_for_preset(preset), seed=args.seed, volume_every=args.volume_every)
    pool = (
        pool_of_slices([s for case in real for s in case.slices], config.patches_per_slice, args.seed) if real else []
    )
    started = time.monotonic()
    deadline = started + 60 * args.minutes
    log = log_path.open("a")

    def write(entry: dict) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    write(
        {
            "event": "start",
            "device": describe_device(device),
            "run": run,
            "config": config.identity(),
            "width": args.width,
            "train_cases": [c.name for c in real],
            "held_out": [c.name for c in held],
        }
    )
    done = 0

    def on_step(record: dict) -> None:
        nonlocal done
        done = record["iteration"]
        if done % 50 == 0:
            write({"iteration": done, "loss": record["loss"], "s": round(time.monotonic() - started, 1)})

    try:
        train_base_model(
            model,
            pool,
            preset.training_spacing_mm,
            config,
            device=device,
            checkpoint_path=checkpoint,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume and checkpoint.exists(),
            log=lambda message: print(message, flush=True),
            progress=False,
            preset=preset.name,
            synthetic=synthetic,
            cancel=lambda: time.monotonic() > deadline,
            workers=args.workers,
            on_step=on_step,
        )
    except Cancelled:  # the minutes are up: the model in memory is the run's
        pass
    seconds = time.monotonic() - started
    metadata = anatomy_model_metadata(
        model,
        preset,
        config,
        synthetic,
        done,
        train_cases=[c.name for c in real],
        held_out=[c.name for c in held],
        device=describe_device(device),
        wall_time_s=round(seconds, 1),
    )
    model.eval()
    save_model(ModelBundle(model, metadata), model_path, overwrite=True)
    summary = {
        "event": "end",
        "iterations": done,
        "seconds": round(seconds, 1),
        "iterations_per_s": round(done / max(seconds, 1e-9), 2),
        "model": model_path.name,
    }
    summary |= device_timings(model.to(device), preset, device, args.timing_slices)
    write(summary)
    log.close()
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="pack the label maps and the real training slices (needs SimpleITK)")
    p.add_argument("--preset", default="brain-wmh", choices=["brain-wmh", "brain-tumor"])
    p.add_argument("--maps", type=Path, default=DEFAULT_DATA / "synthseg_label_maps")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, required=True, help="the pack file (.npz)")
    t = commands.add_parser("train", help="train from a pack (torch, numpy and scipy only)")
    t.add_argument("--pack", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True, help="folder for the model, checkpoint and log")
    t.add_argument("--minutes", type=float, required=True, help="stop cleanly after this much wall time")
    t.add_argument("--width", type=int, default=64, help="network width (the paper's: 64)")
    t.add_argument("--iterations", type=int, default=1_000_000, help="at most this many iterations")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--hold-out", metavar="CASES", help="as train_anatomy.py --hold-out: the scans that do not train")
    t.add_argument("--workers", type=int, default=12, help="processes drawing batches ahead (0: in the main process)")
    t.add_argument("--volume-every", type=int, default=4, help="iterations between new synthetic volumes")
    t.add_argument("--sequence-dropout", type=float, default=0.2)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--timing-slices", type=int, default=155, help="slices of the inference timing's stack")
    t.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="where the run's checkpoint goes (default: --out; a device run may only bring 8 files back)",
    )
    t.add_argument("--threads", type=int, help="torch CPU threads of the main process (default: torch's)")
    t.add_argument("--resume", action="store_true", help="continue from the run's checkpoint in --out")
    args = parser.parse_args(argv)
    if args.command == "pack":
        print(json.dumps(pack(args.preset, args.maps, args.data, args.out)))
    else:
        print(json.dumps(train(args)))


if __name__ == "__main__":
    main()
