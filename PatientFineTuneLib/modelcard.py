"""Model cards: what a base model reads, how it was trained, how well it does on data it
never saw. The card lives in the model file's metadata (``metadata["card"]``) and is
rendered to Markdown next to the file, so the two cannot drift apart."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

from .files import atomic_write
from .presets import PRESETS

# torch is imported inside the functions that need it: the Slicer module lists the shipped
# models before PyTorch is installed.

PAPER_WIDTH = 64
PAPER_ITERATIONS = 10_000
#: The shipped base models, their cards and ``registry.json``: package data, so that a
#: wheel (``pip install .``), the editable install and the Slicer extension (which copies
#: the package) all carry the same files. Resources/Models/build_models.py writes them.
MODELS = Path(__file__).resolve().parent / "models"
REGISTRY = "registry.json"


def read_registry(folder: str | os.PathLike | None = None) -> dict[str, dict]:
    """The entries of ``registry.json`` in ``models/`` (or ``folder``), by model name:
    ``{"name", "file", "card", "sha256" (of the file's bytes), "sequences"}``. Empty when
    there is no registry."""
    path = Path(folder or MODELS) / REGISTRY
    if not path.is_file():
        return {}
    return {entry["name"]: entry for entry in json.loads(path.read_text())["models"]}


def shipped_models(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """The base models the registry in ``models/`` (or ``folder``) lists, by preset name, in
    preset order (a listed file that is absent is left out)."""
    folder = Path(folder or MODELS)
    registry = read_registry(folder)
    paths = {name: folder / registry[name]["file"] for name in PRESETS if name in registry}
    return {name: path for name, path in paths.items() if path.is_file()}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shipped_model(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The shipped model ``name``, its bytes checked against the registry's sha256 (no
    torch needed). Raises FileNotFoundError when none is shipped, ValueError when the file
    was changed or damaged."""
    folder = Path(folder or MODELS)
    path = shipped_models(folder).get(name)
    if path is None:
        raise FileNotFoundError(f"no base model for preset {name} is installed in {folder}; give a model file instead")
    expected = read_registry(folder)[name]["sha256"]
    if file_sha256(path) != expected:
        raise ValueError(
            f"the shipped base model {path} does not match the sha256 in {folder / REGISTRY} (damaged or "
            "replaced); reinstall PatientFineTuneLib, or rebuild it with Resources/Models/build_models.py"
        )
    return path


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A model file, or the shipped base model when ``name`` is a preset name (and no
    file of that name exists), checked against the registry's sha256."""
    path = Path(name)
    # only a *file* of that name wins: a folder called like a preset is not a model
    if path.is_file() or str(name) not in PRESETS:
        return path
    return verify_shipped_model(str(name))


def register_shipped_model(path: str | os.PathLike, card: str | os.PathLike) -> dict:
    """Add or replace the entry of the model file ``path`` and its card in the
    ``registry.json`` of its folder (entries in preset order); returns the entry."""
    path = Path(path)
    metadata = read_model_metadata(path)
    name = metadata.get("preset")
    if name not in PRESETS:
        raise ValueError(f"{path} has no preset ({name!r}); only a preset's base model ships")
    entry = {
        "name": name,
        "file": path.name,
        "card": Path(card).name,
        "sha256": file_sha256(path),
        "sequences": [{"name": s["name"], "channels": s["channels"]} for s in metadata["sequences"]],
    }
    registry = {**read_registry(path.parent), name: entry}
    text = (
        json.dumps(
            {"format": "PatientFineTune-model-registry", "models": [registry[n] for n in PRESETS if n in registry]},
            indent=1,
        )
        + "\n"
    )
    atomic_write(path.parent / REGISTRY, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    return entry


class _MetadataOnlyUnpickler(pickle.Unpickler):
    """Reads a model file's pickle without torch: tensors come back as None, and any
    class other than the few a tensor state dict names is refused (nothing executes)."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2") or (module == "torch" and name.endswith("Storage")):
            return lambda *args, **kwargs: None
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a model file")

    def persistent_load(self, pid):
        return None


def read_model_metadata(path: str | os.PathLike) -> dict:
    """A model file's metadata, read without PyTorch (the Slicer module shows what a model
    reads before PyTorch is installed). Its integrity is not checked here: every job loads
    the model with :func:`~PatientFineTuneLib.modelfile.load_model`, which does.

    Raises ValueError for a file that is not a PatientFineTune model.
    """
    path = resolve_model_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            payload = _MetadataOnlyUnpickler(archive.open(name)).load()
        if payload.get("format") != "PatientFineTune-model":
            raise ValueError("no PatientFineTune header")
        return json.loads(payload["metadata_json"])
    except (
        zipfile.BadZipFile,
        StopIteration,
        pickle.UnpicklingError,
        ValueError,
        KeyError,
        AttributeError,
        EOFError,
    ) as exc:
        raise ValueError(f"{path} is not a PatientFineTune model file ({exc}); nothing from it was executed") from None


def training_data_entries(entries: Sequence[tuple[str, str, str]]) -> list[dict]:
    """``[(source, cases, licence), ...]`` as card rows."""
    return [{"source": source, "cases": cases, "licence": licence} for source, cases, licence in entries]


def is_paper_configuration(metadata: dict) -> bool:
    config = metadata.get("training", {}).get("config", {})
    return metadata["architecture"]["width"] == PAPER_WIDTH and config.get("iterations") == PAPER_ITERATIONS


def _fmt(summary: dict, digits: int = 2) -> str:
    if not summary or summary.get("n", 0) == 0:
        return "n/a"
    if summary["n"] == 1:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}"


def _spacing_line(metadata: dict) -> str:
    spacing = metadata["training_spacing_mm"]
    if len(spacing) == 3:  # 3D U-Net
        return (
            f"- Voxel size: volumes are resampled to {spacing[0]:.3f} mm isotropic for the network, segmented in "
            f"overlapping {metadata.get('patch_voxels')}^3-voxel windows, and results are resampled back."
        )
    return (
        f"- In-plane spacing: slices are resampled to {spacing[0]:.3f} x {spacing[1]:.3f} mm for the network "
        "and results are resampled back."
    )


def _network_line(metadata: dict) -> str:
    arch = metadata["architecture"]
    if arch.get("type") == "unet3d":
        return (
            f"3D U-Net (Wahlig et al. 2023): {arch['depth']} down- and {arch['depth']} up-sampling blocks, "
            f"first-level width {arch['width']}, instance normalisation, dropout {arch['dropout']} before the output layer"
        )
    return (
        f"Multi-pathway dilated 2D CNN (Jansen et al. 2020): width {arch['width']}, head width {arch['head_width']}, "
        f"dropout {arch['dropout']}, dilations {arch['dilations']}, receptive field {metadata.get('receptive_field_px')} px"
    )


def render_card(metadata: dict, parameters: int | None = None) -> str:
    """Markdown model card from a model file's metadata (with ``metadata["card"]``)."""
    card = metadata.get("card", {})
    training = metadata.get("training", {})
    config = training.get("config", {})
    arch = metadata["architecture"]
    preset = PRESETS.get(metadata.get("preset") or "")
    # cards written before segmentations had a minimum lesion size record none: every lesion kept
    measured_min = card.get("min_lesion_voxels", 1)
    inputs = ", ".join(
        f"{i + 1}. {s['name']} ({s['channels']} channel{'s' if s['channels'] > 1 else ''}"
        f"{'; optional: trained to read scans without it' if s.get('optional') else ''})"
        for i, s in enumerate(metadata["sequences"])
    )
    lines = [f"# Base model `{metadata.get('preset')}`", ""]
    if preset:
        lines += [preset.description + ".", ""]
    if arch.get("type") == "unet3d":
        lines += [
            f"> **Reduced configuration.** Trained at {metadata['training_spacing_mm'][0]} mm voxels, first-level width "
            f"{arch['width']}, {config.get('iterations')} iterations of batch {config.get('batch_size')} "
            "(Wahlig et al. 2023: 1 mm voxels, 30 epochs of 180 augmented patches per study, elastic deformations).",
            "",
        ]
    elif card.get("training_runs"):
        runs = card["training_runs"]
        lines += [
            f"> **Reduced configuration.** Trained on a CPU with width {arch['width']}: "
            f"{sum(r['iterations'] for r in runs):,} iterations of batch {config.get('batch_size')} over {len(runs)} "
            f"runs, {sum(r['wall_time_s'] for r in runs) / 3600:.1f} h, instead of the paper's width {PAPER_WIDTH} "
            f"and {PAPER_ITERATIONS:,} iterations. `Resources/Models/gpu_run.sh` trains width "
            f"{PAPER_WIDTH} when a GPU is at hand.",
            "",
        ]
    elif not is_paper_configuration(metadata):
        lines += [
            f"> **Reduced configuration.** Trained on a CPU with width {arch['width']} and "
            f"{config.get('iterations')} iterations instead of the paper's width {PAPER_WIDTH} and "
            f"{PAPER_ITERATIONS:,} iterations (no GPU was available). The paper-configuration "
            "weights are still owed; the build command below with its defaults produces them.",
            "",
        ]
    lines += [
        "Intended use: research, and the patient-specific fine-tuning workflow of this project (the base model is the "
        "starting point that fine-tuning adapts to each patient). Not a medical device; not for diagnosis.",
        "",
    ]
    if card.get("notes"):
        lines += ["## Notes", "", *(f"- {note}" for note in card["notes"]), ""]
    lines += [
        "## Inputs",
        "",
        f"- Sequences, in pathway order: {inputs}. Multi-channel sequences are one 4D or vector image.",
        "- All sequences on one grid (co-registered); any orientation: geometry is read from the header and "
        "2D slices are taken along the acquisition axis (largest spacing).",
        _spacing_line(metadata),
        f"- Normalisation: {metadata.get('normalisation')}.",
        f"- Organ mask: {preset.organ + (' (computed automatically when none is given)' if preset.auto_organ_mask else ' (required)') if preset else 'as trained'}.",
        "",
        "## Network",
        "",
        _network_line(metadata) + (f", {parameters:,} parameters" if parameters else "") + ".",
        "",
        "## Training",
        "",
        f"- Build command: `{card.get('build_command', 'n/a')}`",
    ]
    if card.get("training_runs"):
        lines += [
            "- Training runs, in order (each started from the one before; curves in `Resources/Models/training/`):"
        ]
        lines += [
            f"  {k + 1}. `{r['command']}`: {r['iterations']:,} iterations, {r['wall_time_s'] / 60:.0f} min"
            for k, r in enumerate(card["training_runs"])
        ]
        lines += [
            f"- Export of the last run: `{training.get('command', 'n/a')}`",
            f"- Configuration of the last run: {json.dumps(config, sort_keys=True)}",
        ]
    else:
        lines += [
            f"- Training command: `{training.get('command', 'n/a')}`",
            f"- Configuration: {json.dumps(config, sort_keys=True)}",
            f"- Hardware: {training.get('hardware', 'n/a')}; wall time {training.get('wall_time_s', 0) / 60:.1f} min",
            f"- Final training loss {training.get('final_loss', float('nan')):.4f}; validation Dice {training.get('final_val_dice') or float('nan'):.3f} (one synthetic follow-up)",
        ]
    lines += [
        "",
        "| training data | cases | licence |",
        "|---|---|---|",
    ]
    lines += [f"| {d['source']} | {d['cases']} | {d['licence']} |" for d in card.get("training_data", [])]
    lines += ["", f"Training cases recorded in the file: {', '.join(training.get('train_cases', []))}.", ""]
    lines += [
        "## Held-out results",
        "",
        f"Whole-volume segmentation ({_postprocessing(preset, measured_min)}) of cases not used for training; mean ± SD over cases "
        "(one value where there is one case).",
        "",
    ]
    if preset and preset.min_lesion_voxels != measured_min:
        lines += [
            f"Measured {_smallest_lesion(measured_min)}; this preset's segmentations now drop lesions of fewer than "
            f"{preset.min_lesion_voxels} voxels (docs/results.md has the shipped models' numbers with it on the real scans).",
            "",
        ]
    lines += [
        "| set | cases | Dice | AVD % | HD95 mm | lesion recall | lesion precision | lesion F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for row in card.get("evaluation", []):
        m = row["metrics"]
        lines.append(
            f"| {row['set']} | {row['cases']} | {_fmt(m['dice'])} | {_fmt(m['avd_percent'], 0)} | {_fmt(m['hd95_mm'], 1)} | "
            f"{_fmt(m['lesion_recall'])} | {_fmt(m['lesion_precision'])} | {_fmt(m['lesion_f1'])} |"
        )
        if row.get("note"):
            notes.append(f"- {row['set']}: {row['note']}")
    lines += ["", *notes] if notes else []
    if card.get("longitudinal"):
        # which studies these are, and how they were read, comes with the card (the script that built the model
        # writes it); the rest says what the table measures
        lines += [
            "",
            f"{card.get('longitudinal_about') or 'Longitudinal studies'}. Their reference marks only lesion *change* "
            "between the two studies, so what can be checked is that the two segmentations together cover the changed voxels:",
            "",
            "| patient | change voxels covered | change regions touched | lesion volume study 1 / 2 (ml) |",
            "|---|---|---|---|",
        ]
        for r in card["longitudinal"]:
            v = r["lesion_volume_ml"]
            lines.append(
                f"| {r['case']} | {100 * r['change_voxels_covered']:.0f}% | {r['change_regions_touched']} / {r['change_regions']} | "
                f"{v['study1']:.1f} / {v['study2']:.1f} |"
            )
    lines += ["", "Per-case numbers are in the file's metadata (`patient-finetune info`).", ""]
    lines += [
        "## File",
        "",
        f"sha256 `{metadata.get('sha256', '')}` (metadata and weights; checked on every load).",
        "",
    ]
    return "\n".join(lines)


def write_shipped_model(
    source: str | os.PathLike, card: dict, model_out: str | os.PathLike, card_out: str | os.PathLike
) -> list[Path]:
    """Copy a trained model to ``model_out`` (``<preset>.pt``) with ``card`` in its metadata,
    write the rendered card to ``card_out`` and enter both, with the file's sha256, in the
    ``registry.json`` next to ``model_out``. Each is replaced atomically."""
    from .model import count_parameters
    from .modelfile import ModelBundle, load_model, save_model

    bundle = load_model(source)
    metadata = dict(bundle.metadata)
    metadata["card"] = card
    shipped = ModelBundle(bundle.model, metadata)
    save_model(shipped, model_out, overwrite=True)
    text = render_card(load_model(model_out).metadata, count_parameters(bundle.model))  # the file's, hash included
    atomic_write(Path(card_out), lambda tmp: Path(tmp).write_text(text), overwrite=True)
    register_shipped_model(model_out, card_out)
    return [Path(model_out), Path(card_out), Path(model_out).parent / REGISTRY]


def _smallest_lesion(min_lesion_voxels: int) -> str:
    return (
        "keeping every lesion"
        if min_lesion_voxels <= 1
        else f"dropping lesions of fewer than {min_lesion_voxels} voxels"
    )


def _postprocessing(preset, min_lesion_voxels: int) -> str:
    """The post-processing a card's held-out numbers were measured with, in words."""
    steps = ["threshold 0.5", "3x3x3 closing"] + (["per-slice opening"] if preset and preset.opening else [])
    return ", ".join(steps + ([_smallest_lesion(min_lesion_voxels)] if min_lesion_voxels > 1 else []))


def required_sequences(sequences: Sequence[dict]) -> int:
    """How many of a model's sequences a scan must have: a model trained with sequence
    dropout reads scans without its trailing optional sequences (a FLAIR-only follow-up to a
    FLAIR + T1 model)."""
    needed = len(sequences)
    while needed > 1 and sequences[needed - 1].get("optional"):
        needed -= 1
    return needed


def describe_sequences(sequences: Sequence[dict]) -> str:
    """ "FLAIR, T1 (T1 optional)": the order a model reads its sequences in."""
    names = [s["name"] for s in sequences]
    optional = names[required_sequences(sequences) :]
    return ", ".join(names) + (f" ({', '.join(optional)} optional)" if optional else "")


def describe_base_model(metadata: dict, name: str) -> str:
    """One line for the model chooser: preset, sequences read and the card's first
    held-out Dice."""
    sequences = ", ".join(s["name"] for s in metadata.get("sequences", []))
    kind = "3D U-Net" if metadata.get("architecture", {}).get("type") == "unet3d" else "2D network"
    text = f"{metadata.get('preset') or name}: {kind}, reads {sequences}"
    evaluation = (metadata.get("card") or {}).get("evaluation") or []
    if evaluation:
        dice = evaluation[0]["metrics"]["dice"]
        text += f"; held-out Dice {dice['mean']:.2f} on {evaluation[0]['set']}"
    return text


def describe_patient_model(finetune: dict) -> str:
    """What a patient model is, from its ``finetune`` metadata, in one line: the slices and
    path of the 2D network or the whole volume and layers of a 3D U-Net, and the outcome
    of the hold-out check (said plainly when the base model was kept)."""
    iterations = finetune.get("config", {}).get("iterations", "?")
    check = finetune.get("holdout_check")
    # the layers of a 2D fine-tuning: the check's choice (older records lack it: the config's)
    layers = (check or {}).get("layers") or finetune.get("config", {}).get("layers")
    every_layer = "every layer, " if "slices" in finetune and layers == "all" else ""
    if "slices" in finetune:
        where = f"slices {', '.join(map(str, finetune['slices']))}"
        if finetune.get("hard_negative_slices"):
            where += f" and the lesion-free slices {', '.join(map(str, finetune['hard_negative_slices']))} where the base model found lesion"
    else:
        where = f"the whole baseline volume ({finetune.get('strategy') or finetune.get('config', {}).get('layers', '?')} layers)"
    if check and check.get("skipped"):
        check = None
        skipped = f"; the never-worse check was skipped ({finetune['holdout_check']['skipped']})"
    else:
        skipped = ""
    if check and not check["kept"]:
        longer = [c["iterations"] for c in check.get("compared") or [] if c.get("beats_base")]
        return (
            f"the BASE MODEL was kept: fine-tuning ({every_layer}{iterations} iterations on {where}) did not help on {_held_out_part(check)} "
            f"of your annotation ({_check_numbers(check)})"
            + (
                f"; {', '.join(map(str, longer))} iterations did better there, but too narrowly to replace the asked iterations"
                if longer
                else ""
            )
        )
    # the fraction the model trained on; files written before 2026-12-06 lack it, and there
    # the approximate mode applied where only the head trained
    fraction = finetune.get(
        "pixel_fraction", finetune.get("config", {}).get("pixel_fraction", 1.0) if layers == "head" else 1.0
    )
    how = [f"{finetune['method']} path"] if "method" in finetune else []
    how += [f"{fraction:.0%} of each patch's pixels per iteration"] if fraction < 1 else []
    share = finetune.get("config", {}).get("finetuned_share", 1.0)
    how += [f"the weights {share:.0%} of the way from the base model's"] if share < 1 else []
    if (
        finetune.get("continued_from_check_model") and check
    ):  # the check's model at its chosen count, trained on further
        iterations = f"{check['iterations']} iterations on the check's half of the annotation, then {iterations}"
    text = f"fine-tuned {every_layer}{iterations} iterations on {where}" + (f" ({', '.join(how)})" if how else "")
    if check:
        text += f"; checked on {_held_out_part(check)} of the annotation: {_check_numbers(check)}"
        if check.get("compared"):
            text += f" (best of {', '.join(str(c['iterations']) for c in check['compared'])} iterations there)"
    return text + skipped


def describe_held_out(check: dict) -> str:
    """What the never-worse check held out and its numbers, in words."""
    return f"{_held_out_part(check)}; {_check_numbers(check)}"


def _held_out_part(check: dict) -> str:
    slices = check.get("held_out_slices")
    if check.get("folds", 1) > 1:  # each half held out in turn (records before 2026-12-01 have one fold)
        how = f"slices {', '.join(map(str, slices))}" if check.get("split") == "slices" and slices else "a checkerboard"
        return f"the held-out halves ({how}, each half held out in turn)"
    if check.get("split") == "slices" and slices:
        return f"held-out slice{'s' if len(slices) > 1 else ''} {', '.join(map(str, slices))}"
    return "the held-out half"


def _check_numbers(check: dict) -> str:
    """The check's numbers, fine-tuned vs base (records before lesion F1 have Dice only)."""
    text = f"Dice {check['dice_finetuned']:.3f} fine-tuned vs {check['dice_base']:.3f} base"
    if "lesion_f1_base" in check:
        text += f", lesion F1 {check['lesion_f1_finetuned']:.3f} vs {check['lesion_f1_base']:.3f}"
    return text
