"""The base models in PatientFineTuneLib/models: present for every preset that ships one, intact,
listed in the registry with their sha256, described by their cards, and able to segment a
generated patient of their preset."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from PatientFineTuneLib.inference import segment_case
from PatientFineTuneLib.metrics import lesion_detection
from PatientFineTuneLib.model import count_parameters
from PatientFineTuneLib.modelcard import (
    MODELS,
    REGISTRY,
    file_sha256,
    read_registry,
    render_card,
    resolve_model_path,
    shipped_models,
    verify_shipped_model,
)
from PatientFineTuneLib.modelfile import load_model
from PatientFineTuneLib.presets import PRESETS
from PatientFineTuneLib.synth import generate_pair, visit_case

from conftest import model_script

SHIPPED = [name for name, preset in PRESETS.items() if preset.ships_base_model]


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    name = request.param
    path = shipped_models().get(name)
    assert path is not None, f"{MODELS / (name + '.pt')} is missing; build it with Resources/Models/build_models.py"
    return name, path, load_model(path)  # load_model checks the sha256


def test_metadata_matches_the_preset_and_the_network(shipped):
    name, path, bundle = shipped
    meta, preset = bundle.metadata, PRESETS[name]
    assert meta["preset"] == name
    assert [(s["name"], s["channels"]) for s in meta["sequences"]] == list(preset.sequences)
    assert tuple(bundle.model.in_channels) == tuple(c for _, c in preset.sequences)
    assert meta["receptive_field_px"] == bundle.model.receptive_field() == 123
    assert tuple(meta["training_spacing_mm"]) == preset.training_spacing_mm
    assert path.stat().st_size < 10 * 2**20
    if meta["card"].get("training_runs"):  # shipped from the anatomy-synthesis runs: the export's command
        assert meta["training"]["command"].startswith("python Resources/Models/train_anatomy.py")
        assert "--export" in meta["training"]["command"]
    else:
        assert meta["training"]["command"].startswith("patient-finetune train-base")


def test_card_has_held_out_results_and_matches_the_file(shipped):
    name, path, bundle = shipped
    card = bundle.metadata["card"]
    assert card["training_data"] and card["build_command"].startswith("python Resources/Models/build_models.py")
    assert card["evaluation"] and all(row["cases"] > 0 for row in card["evaluation"])
    for row in card["evaluation"]:
        assert 0.0 <= row["metrics"]["dice"]["mean"] <= 1.0
        assert len(row["per_case"]) == row["cases"]
    # the Markdown card next to the file is exactly what the metadata renders to
    assert path.with_suffix(".md").read_text() == render_card(bundle.metadata, count_parameters(bundle.model))


def test_the_registry_lists_each_shipped_model_with_its_sha256_card_and_sequences(shipped):
    name, path, bundle = shipped
    entry = read_registry()[name]
    assert path == MODELS / entry["file"] == MODELS / f"{name}.pt"
    assert entry["sha256"] == file_sha256(path)  # the registry was updated with the file
    assert (MODELS / entry["card"]) == path.with_suffix(".md")
    assert entry["sequences"] == [{"name": s["name"], "channels": s["channels"]} for s in bundle.metadata["sequences"]]
    assert resolve_model_path(name) == verify_shipped_model(name) == path


def test_a_changed_shipped_model_is_refused_by_its_registry_sha256(tmp_path):
    """The registry's sha256 is checked whenever a preset name resolves to its model
    (torch-free): a damaged or replaced file is refused, not loaded."""
    for source in MODELS.glob("brain-wmh.*"):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / REGISTRY).write_text(json.dumps({"models": [read_registry()["brain-wmh"]]}))
    assert verify_shipped_model("brain-wmh", tmp_path) == tmp_path / "brain-wmh.pt"
    data = bytearray((tmp_path / "brain-wmh.pt").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "brain-wmh.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256"):
        verify_shipped_model("brain-wmh", tmp_path)
    with pytest.raises(FileNotFoundError, match="no base model for preset brain-tumor"):
        verify_shipped_model("brain-tumor", tmp_path)
    assert shipped_models(tmp_path / "empty") == {}


def test_segments_a_generated_patient_of_its_preset(shipped):
    name, _, bundle = shipped
    case = visit_case(generate_pair(name, seed=4242, small=True), "followup")
    result = segment_case(bundle, case, opening=PRESETS[name].opening, device="cpu")
    assert result.probability.shape == case.organ.shape
    assert 0.0 <= result.probability.min() and result.probability.max() <= 1.0
    assert not (result.mask & ~case.organ).any()
    detection = lesion_detection(result.mask, case.lesions)
    assert detection["detected_gt_lesions"] >= 1, detection


def test_cli_finds_shipped_models_by_preset_name():
    name = next(iter(shipped_models()))
    out = subprocess.run(
        [sys.executable, "-m", "PatientFineTuneLib.cli", "info", name, "--card"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith(f"# Base model `{name}`") and "Held-out results" in out
    missing = subprocess.run(
        [sys.executable, "-m", "PatientFineTuneLib.cli", "info", "not-a-model.pt"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_shipped_probabilities_are_reproducible():
    name, path = next(iter(shipped_models().items()))
    case = visit_case(generate_pair(name, seed=7, small=True), "followup")
    a = segment_case(load_model(path), case, device="cpu").probability
    b = segment_case(load_model(path), case, device="cpu").probability
    assert np.array_equal(a, b)


def test_shipped_models_are_listed_without_torch():
    # the Slicer module lists them before PyTorch is installed
    code = "import sys; sys.modules['torch'] = None; from PatientFineTuneLib.modelcard import shipped_models; print(sorted(shipped_models()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(SHIPPED))


def test_the_build_scripts_evaluation_scores_a_case_in_stored_order(tmp_path):
    """build_models.py's evaluation (it writes the cards' held-out tables) runs on the
    current library: a generated patient written to disk, segmented and scored against
    its own lesion mask in stored voxel order. (It had gone stale: it imported a function
    the geometry fixes removed.)"""
    from PatientFineTuneLib.synth import write_pair

    build_models = model_script("build_models")
    write_pair(generate_pair("brain-wmh", 7, small=True), tmp_path / "pair", preview=False)
    visit = tmp_path / "pair" / "followup"
    files = {
        "sequence_paths": [visit / "FLAIR.nii.gz", visit / "T1.nii.gz"],
        "organ_path": visit / "organ.nii.gz",
        "lesion_path": visit / "lesions.nii.gz",
    }
    preset = PRESETS["brain-wmh"]
    bundle = load_model(shipped_models()["brain-wmh"])
    (row,) = build_models.evaluate_cases(bundle, preset, [("small", files)], "cpu")
    # the shipped model finds the lesions of its own preset's patient: a score taken with
    # prediction and truth in different voxel orders would be near 0
    assert row["case"] == "small" and row["dice"] > 0.5 and row["lesion_recall"] > 0.5
    # its T1 is optional (sequence dropout), and the card scores it on the FLAIR alone too
    assert bundle.metadata["sequences"][1].get("optional")
    (alone,) = build_models.evaluate_cases(bundle, preset, [("small", files)], "cpu", first_only=True)
    assert alone["dice"] > 0.25 and alone["dice"] != row["dice"]  # the synthetic patients are cartoon-like: 0.39


def test_leave_one_out_folds_hold_out_each_real_case_of_its_dataset_once():
    """``build_models.py --leave-out CASE``: CASE is held out, the other cases of its
    dataset train (the shipped held-out one included), other datasets keep their roles."""
    build_models = model_script("build_models")
    for preset, dataset in (("brain-wmh", "ljubljana_ms_cross"), ("brain-tumor", "brats2015_subset")):
        plan = build_models.PLANS[preset]
        cases = [c for d, c, _ in plan["real_train"] + plan["real_test"] if d == dataset]
        held_out = []
        for case in cases:
            fold = build_models.leave_out(plan, case)
            train = [(d, c) for d, c, _ in fold["real_train"]]
            test = [(d, c) for d, c, _ in fold["real_test"]]
            assert (dataset, case) in test and (dataset, case) not in train
            assert sorted(c for d, c in train if d == dataset) == sorted(set(cases) - {case})
            # the other datasets' cases stay where the plan puts them (the tumour pairs are never trained on)
            assert [e for e in test if e[0] != dataset] == [(d, c) for d, c, _ in plan["real_test"] if d != dataset]
            assert fold["suffix"] == f"-without-{case}"
            held_out += [c for d, c in test if d == dataset]
        assert sorted(held_out) == sorted(cases)
    with pytest.raises(SystemExit, match="not a real case"):
        build_models.leave_out(build_models.PLANS["brain-wmh"], "patient99")
    with pytest.raises(SystemExit, match="never trains on brain_tumor_progression"):
        build_models.leave_out(build_models.PLANS["brain-tumor"], "01/Pre")


def test_the_cards_leave_one_out_row_scores_each_case_by_the_fold_that_held_it_out(tmp_path):
    """build_models.py's leave-one-out row: the folds' JSON (as ``--leave-out`` writes
    them) give their held-out case only, the shipped model's own held-out case completes
    the dataset, and no fold means no row."""
    import json

    build_models = model_script("build_models")
    preset = PRESETS["brain-wmh"]
    metrics = {
        "dice": 0.0,
        "avd_percent": 0.0,
        "hd95_mm": 1.0,
        "lesion_recall": 0.5,
        "lesion_precision": 0.5,
        "lesion_f1": 0.5,
    }
    shipped = [
        {
            "set": "ljubljana_ms_cross (held out)",
            "per_case": [{**metrics, "case": "ljubljana_ms_cross/patient26", "dice": 0.6}],
        }
    ]
    assert build_models.leave_one_out_row(tmp_path, preset, shipped) is None
    for case, dice in (("patient07", 0.2), ("patient19", 0.4)):
        # a fold also scores the synthetic follow-ups; they are not part of the row
        evaluation = [
            {"per_case": [{**metrics, "case": "synthetic/patient300/followup", "dice": 0.9}]},
            {"per_case": [{**metrics, "case": f"ljubljana_ms_cross/{case}", "dice": dice}]},
        ]
        (tmp_path / f"brain-wmh-without-{case}.json").write_text(
            json.dumps({"left_out": case, "evaluation": evaluation})
        )
    row = build_models.leave_one_out_row(tmp_path, preset, shipped)
    assert row["cases"] == 3 and row["set"] == "ljubljana_ms_cross, leave-one-out"
    assert [r["case"] for r in row["per_case"]] == [f"ljubljana_ms_cross/patient{n}" for n in ("07", "19", "26")]
    assert abs(row["metrics"]["dice"]["mean"] - 0.4) < 1e-9


def test_each_real_scan_of_an_anatomy_model_is_scored_by_the_fold_that_never_trained_on_it(tmp_path):
    """``build_models.py --from-anatomy``: every real case gets the fold model whose
    recorded training scans leave it out (a tumour-pair visit named ``01/Pre`` in the plan,
    ``01_Pre`` in the fold's metadata), and a case every fold trained on is refused."""
    from PatientFineTuneLib.modelfile import ModelBundle, make_metadata, save_model

    from conftest import tiny_model

    build_models = model_script("build_models")
    scans = [
        "brats2015_subset/brats_2013_pat0001_1",
        "brain_tumor_progression/01_Pre",
        "brain_tumor_progression/01_Post",
    ]
    folds = []
    for k in range(len(scans)):
        net = tiny_model(in_channels=(1,))
        path = tmp_path / f"fold{k}.pt"
        meta = make_metadata(
            net, [{"name": "T1c", "channels": 1}], (0.958, 0.958), training={"train_cases": scans[:k] + scans[k + 1 :]}
        )
        save_model(ModelBundle(net, meta), path)
        folds.append(path)
    chosen = build_models.held_out_models(
        folds,
        ["brats2015_subset/brats_2013_pat0001_1", "brain_tumor_progression/01/Pre", "brain_tumor_progression/01/Post"],
    )
    assert list(chosen.values()) == folds
    with pytest.raises(SystemExit, match="every fold trained on brats2015_subset/brats_2013_pat0001_1"):
        build_models.held_out_models(folds[1:], ["brats2015_subset/brats_2013_pat0001_1"])


def test_the_anatomy_recipe_names_committed_checkpoints_and_curves_at_its_iterations():
    """The runs ``--from-anatomy`` ships from are in the repository, so the model can be
    rebuilt on any machine: each run's curve, and the last run's and every fold's checkpoint
    at the iterations the recipe says; the card's runs carry their wall time."""
    build_models = model_script("build_models")
    for name, recipe in build_models.ANATOMY.items():
        runs = build_models.anatomy_runs(PRESETS[name])
        assert [r["run"] for r in runs] == [run for run, _, _ in recipe["runs"]]
        assert all(
            r["wall_time_s"] > 0 and r["command"].startswith("python Resources/Models/train_anatomy.py") for r in runs
        )
        last, iterations, _ = recipe["runs"][-1]
        payload = torch.load(build_models.TRAINING / f"{last}.checkpoint.pt", map_location="cpu", weights_only=True)
        assert payload["iteration"] == iterations
        for fold in recipe["folds"]:
            hold_out = fold[fold.index("--hold-out") + 1].replace(",", "+")
            rate = f"-lr{float(fold[fold.index('--learning-rate') + 1]):g}" if "--learning-rate" in fold else ""
            assert (build_models.TRAINING / f"{name}-anatomy-loo-{hold_out}{rate}.checkpoint.pt").is_file()


def test_every_export_the_build_makes_passes_the_runs_own_settings_check():
    """``build_models.py --from-anatomy`` exports the committed runs through
    ``train_anatomy.py --export``, which refuses a checkpoint whose settings differ from the
    options given (the card records them). Each export's options must name its run's
    checkpoint and match it on every setting, on any machine (``--precision auto`` takes
    the run's own)."""
    from PatientFineTuneLib.model import LesionNet
    from PatientFineTuneLib.training import checkpoint_setting_differences

    train_anatomy = model_script("train_anatomy")
    build_models = model_script("build_models")
    for name, recipe in build_models.ANATOMY.items():
        preset = PRESETS[name]
        for options in [recipe["export"], *recipe["folds"]]:
            args = train_anatomy.parse_args(["--preset", name, *options, "--export"])
            run = train_anatomy.run_name(
                name, args.width, args.hold_out, args.all_real, args.learning_rate, args.synthetic_fraction
            )
            payload = torch.load(build_models.TRAINING / f"{run}.checkpoint.pt", map_location="cpu", weights_only=True)
            channels = [c for _, c in preset.sequences]
            config = train_anatomy.training_config(args, sum(channels), torch.device("cpu"), payload)
            model = LesionNet(channels, width=args.width)
            assert checkpoint_setting_differences(payload, config, model) == [], (name, options)


def test_an_anatomy_run_of_another_width_has_files_of_its_own():
    """A width-16 run of the anatomy recipe must not resume (or overwrite) the committed
    width-32 run's checkpoint: the width is in the name of every other width's files, and
    the committed runs keep theirs."""
    train_anatomy = model_script("train_anatomy")
    assert train_anatomy.run_name("brain-wmh", 32, None, True, 1e-5) == "brain-wmh-anatomy-all-real-lr1e-05"
    assert train_anatomy.run_name("brain-wmh", 16, None, True, 1e-5) == "brain-wmh-anatomy-w16-all-real-lr1e-05"
    assert train_anatomy.run_name("brain-tumor", 16, "brats_2013_pat0001_1,01", False, None) == (
        "brain-tumor-anatomy-w16-loo-brats_2013_pat0001_1+01"
    )
    # a mixture with another share of synthesised patches has its own files; the synthesis
    # alone has no share to name
    assert (
        train_anatomy.run_name("brain-tumor", 32, "03", False, None, 0.25) == "brain-tumor-anatomy-loo-03-synthetic0.25"
    )
    assert train_anatomy.run_name("brain-tumor", 32, "03", False, None, 0.5) == "brain-tumor-anatomy-loo-03"
    assert train_anatomy.run_name("brain-tumor", 32, None, False, None, 0.25) == "brain-tumor-anatomy"
    build_models = model_script("build_models")
    for recipe in build_models.ANATOMY.values():
        assert all((build_models.TRAINING / f"{run}.checkpoint.pt").is_file() for run, _, _ in recipe["runs"])
