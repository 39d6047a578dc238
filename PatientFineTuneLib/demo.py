"""The end-to-end demo on generated data (README's first command).

Generates synthetic ``brain-wmh`` patients, trains a small base model on three of them on
the CPU (a reduced configuration: width 16, a few hundred iterations), segments the
fourth patient's follow-up and scores it against the known lesions. The fine-tuning
steps join this demo when the fine-tuning engine lands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch


def run_demo(out: Path, overwrite: bool = False, iterations: int = 300, device: str = "auto", n_train: int = 3) -> dict:
    from .cases import find_cases
    from .images import from_slices, load_case, prepare_case, write_image
    from .inference import resolve_device, segment_case
    from .metrics import evaluate_case
    from .model import LesionNet
    from .modelfile import ModelBundle, make_metadata, save_model
    from .montage import montage, radiological, save_png, to_uint8
    from .postprocess import write_csv
    from .presets import get_preset
    from .synth import generate_pair, write_pair
    from .training import TrainingConfig, train_base_model

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    preset = get_preset("brain-wmh")
    names = [n for n, _ in preset.sequences]
    device = resolve_device(device)
    timings = {}

    t = time.perf_counter()
    for seed in range(n_train + 1):
        write_pair(generate_pair(preset.name, seed), out / "patients" / f"patient{seed:03d}", overwrite=True)
    timings["synth_s"] = time.perf_counter() - t
    print(f"generated {n_train + 1} synthetic brain-wmh patients in {timings['synth_s']:.1f} s -> {out / 'patients'}")

    def load(files):
        return prepare_case(load_case(files.sequences, files.organ, files.lesions, sequence_names=names, name=files.name))

    train = [load(f) for f in find_cases(out / "patients", names) if not f.name.startswith("patient000")]
    torch.manual_seed(0)
    model = LesionNet([1, 1], width=16)
    config = TrainingConfig(iterations=iterations, seed=0)
    t = time.perf_counter()
    history = train_base_model(model, train, preset.training_spacing_mm, config, device=device, log=print)
    timings["train_s"] = time.perf_counter() - t
    metadata = make_metadata(
        model, preset.sequence_dicts(), preset.training_spacing_mm, preset=preset.name,
        training={"command": f"patient-finetune demo --iterations {iterations}", "train_cases": [c.name for c in train],
                  "note": "reduced CPU demo configuration (width 16); not the paper configuration"},
    )
    bundle = ModelBundle(model, metadata)
    save_model(bundle, out / "demo-base-model.pt", overwrite=True)

    followup = find_cases(out / "patients" / "patient000" / "followup", names)[0]
    case = load(followup)
    t = time.perf_counter()
    result = segment_case(bundle, case, device=device)
    timings["segment_s"] = time.perf_counter() - t
    seg_dir = out / "patient000-followup"
    write_image(case.to_image(result.mask.astype(np.uint8), sitk.sitkUInt8), seg_dir / "segmentation.nii.gz", overwrite=True)
    write_image(case.to_image(result.probability), seg_dir / "probability.nii.gz", overwrite=True)
    write_csv(result.lesions, seg_dir / "lesions.csv", overwrite=True)

    metrics = evaluate_case(from_slices(result.mask, case.axis), from_slices(case.lesions, case.axis), case.grid.GetSpacing()[::-1])
    # preview: FLAIR of four lesion slices, ground truth vs prediction outlines
    flair = case.images[0]
    slices = case.lesion_slices()
    picks = [slices[int(i)] for i in np.linspace(0, len(slices) - 1, 4)] if slices else []
    direction = case.grid.GetDirection()
    scaled = radiological(to_uint8(flair, case.organ), direction)
    tiles = [scaled[s] for s in picks] * 2
    outlines = [radiological(m[s], direction) for m in (case.lesions, result.mask) for s in picks]
    if tiles:
        save_png(montage(tiles, outlines, 4), seg_dir / "preview.png")
    summary = {"final_loss": history[-1]["loss"], "timings_s": {k: round(v, 1) for k, v in timings.items()}, "device": str(device),
               "followup_metrics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}}
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"follow-up segmentation, probability, lesion table and preview.png (top: truth, bottom: prediction) in {seg_dir}")
    return summary
