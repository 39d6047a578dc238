"""Model cards: written into the model file and next to it, from a real trained model."""

import pytest
import torch

from PatientFineTuneLib.modelcard import (
    file_sha256,
    read_registry,
    render_card,
    shipped_models,
    training_data_entries,
    write_shipped_model,
)
from PatientFineTuneLib.modelfile import ModelBundle, load_model, make_metadata, save_model

from conftest import tiny_model


@pytest.fixture
def trained_file(tmp_path):
    model = tiny_model()
    meta = make_metadata(
        model,
        [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}],
        (0.958, 0.958),
        preset="brain-wmh",
        training={
            "command": "patient-finetune train-base --preset brain-wmh",
            "config": {"iterations": 50},
            "train_cases": ["a", "b"],
            "final_loss": 0.3,
            "final_val_dice": 0.5,
            "wall_time_s": 60.0,
            "hardware": "cpu",
        },
    )
    path = tmp_path / "trained.pt"
    save_model(ModelBundle(model, meta), path)
    return path


def _card(dice_values):
    from PatientFineTuneLib.metrics import summarise

    keys = ("dice", "avd_percent", "hd95_mm", "lesion_recall", "lesion_precision", "lesion_f1")
    return {
        "training_data": training_data_entries([("synthetic", "2 volumes", "generated")]),
        "evaluation": [
            {
                "set": "held out",
                "cases": len(dice_values),
                "note": "a note",
                "metrics": {k: summarise(dice_values) for k in keys},
                "per_case": [],
            }
        ],
        "longitudinal": [],
        "build_command": "python Resources/Models/build_models.py --preset brain-wmh",
    }


def test_card_goes_into_the_file_and_next_to_it(trained_file, tmp_path):
    source_bytes = trained_file.read_bytes()
    out_pt, out_md = tmp_path / "shipped" / "brain-wmh.pt", tmp_path / "shipped" / "brain-wmh.md"
    write_shipped_model(trained_file, _card([0.6, 0.8]), out_pt, out_md)
    assert trained_file.read_bytes() == source_bytes  # the trained file is left alone
    shipped = load_model(out_pt)  # integrity checked with the card inside
    assert shipped.metadata["card"]["evaluation"][0]["cases"] == 2
    text = out_md.read_text()
    assert text == render_card(shipped.metadata, sum(p.numel() for p in shipped.model.parameters()))
    assert "Reduced configuration" in text and "width 4" in text  # not the paper's width 64
    assert "| held out | 2 | 0.70 ± 0.14 |" in text
    assert shipped.metadata["sha256"] in text
    assert torch.equal(
        shipped.model.state_dict()["classifier.5.weight"],
        load_model(trained_file).model.state_dict()["classifier.5.weight"],
    )
    # entered in the registry next to it, which is what finds it by preset name
    assert shipped_models(out_pt.parent) == {"brain-wmh": out_pt}
    assert read_registry(out_pt.parent)["brain-wmh"] == {
        "name": "brain-wmh",
        "file": "brain-wmh.pt",
        "card": "brain-wmh.md",
        "sha256": file_sha256(out_pt),
        "sequences": shipped.metadata["sequences"],
    }


def test_the_card_says_which_smallest_lesion_its_numbers_were_measured_with(trained_file):
    """A card records the minimum lesion size its held-out numbers were measured with; one
    written before segmentations had a minimum (none recorded) says it kept every lesion
    and that the preset's segmentations now drop smaller ones."""
    metadata = load_model(trained_file).metadata
    measured_with = render_card({**metadata, "card": {**_card([0.7]), "min_lesion_voxels": 2}})
    assert "(threshold 0.5, 3x3x3 closing, dropping lesions of fewer than 2 voxels)" in measured_with
    assert "now drop" not in measured_with
    older = render_card({**metadata, "card": _card([0.7])})
    assert "(threshold 0.5, 3x3x3 closing)" in older
    assert "Measured keeping every lesion; this preset's segmentations now drop lesions of fewer than 2 voxels" in older


def test_longitudinal_rows_are_described_by_the_card_not_the_library(trained_file):
    """The card's data (written by the build script) names the longitudinal studies and how
    they were read; the library's renderer holds no data set's description."""
    metadata = load_model(trained_file).metadata
    row = {
        "case": "some_set/patient01",
        "change_voxels_covered": 0.45,
        "change_regions": 13,
        "change_regions_touched": 2,
        "lesion_volume_ml": {"study1": 0.2, "study2": 2.3},
    }
    about = "Longitudinal MS studies (`some_set`, FLAIR in native space)"
    described = render_card({**metadata, "card": {**_card([0.7]), "longitudinal": [row], "longitudinal_about": about}})
    assert f"{about}. Their reference marks only lesion *change* between the two studies" in described
    assert "| some_set/patient01 | 45% | 2 / 13 | 0.2 / 2.3 |" in described
    plain = render_card({**metadata, "card": {**_card([0.7]), "longitudinal": [row]}})
    assert "Longitudinal studies. Their reference marks only lesion *change*" in plain
    assert "Longitudinal" not in render_card({**metadata, "card": _card([0.7])})


def test_a_card_of_the_anatomy_runs_lists_every_run_with_its_time_and_the_optional_sequence(trained_file):
    """A model shipped from several training runs (``build_models.py --from-anatomy``)
    says each run's command and wall time, the total, and which sequence it reads without."""
    metadata = load_model(trained_file).metadata
    metadata = {
        **metadata,
        "sequences": [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1, "optional": True}],
        "card": {
            **_card([0.7]),
            "training_runs": [
                {"run": "a", "iterations": 6000, "wall_time_s": 5400.0, "command": "python train_anatomy.py --first"},
                {"run": "b", "iterations": 1000, "wall_time_s": 1800.0, "command": "python train_anatomy.py --second"},
            ],
        },
    }
    text = render_card(metadata)
    assert "  1. `python train_anatomy.py --first`: 6,000 iterations, 90 min" in text
    assert "  2. `python train_anatomy.py --second`: 1,000 iterations, 30 min" in text
    assert "7,000 iterations of batch" in text and "over 2 runs, 2.0 h" in text
    assert "2. T1 (1 channel; optional: trained to read scans without it)" in text
    assert "Export of the last run: `patient-finetune train-base --preset brain-wmh`" in text
    assert "validation Dice" not in text  # no single synthetic validation case stands for these runs
