"""The 3D U-Net: network, layer groups for transfer, model files, patch sampling,
sliding-window prediction, training and fine-tuning through the common entry points."""

import numpy as np
import pytest
import torch

from PatientFineTuneLib.cases import find_cases
from PatientFineTuneLib.finetune import FinetuneConfig, finetune_patient_model
from PatientFineTuneLib.images import load_case, prepare_case
from PatientFineTuneLib.inference import predict_probability, predict_with_uncertainty, segment_case
from PatientFineTuneLib.metrics import dice
from PatientFineTuneLib.modelfile import (
    ModelBundle,
    ModelFileError,
    build_network,
    load_model,
    make_metadata,
    save_model,
)
from PatientFineTuneLib.unet3d import UNet3D
from PatientFineTuneLib.volume_inference import window_starts
from PatientFineTuneLib.volume_training import (
    VolumeTrainingConfig,
    finetune_volume_model,
    new_volume_model,
    prepare_volumes,
    sample_volume_batch,
    train_volume_model,
    volume_model_metadata,
)

SEQUENCES = [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}]
# small enough for the test suite: 64 mm (32-voxel) patches, 4 filters, a high learning rate
QUICK = dict(spacing_mm=2.0, patch_mm=64.0, batch_size=2, learning_rate=3e-3, class_weights=(1.0, 5.0))


@pytest.fixture(scope="module")
def baseline(small_pair_dir):
    f = find_cases(small_pair_dir / "baseline", ["FLAIR", "T1"])[0]
    return prepare_case(load_case(f.sequences, f.organ, f.lesions))


def volume_bundle(model: UNet3D, config: VolumeTrainingConfig) -> ModelBundle:
    meta = make_metadata(
        model, SEQUENCES, (config.spacing_mm,) * 3, preset="brain-wmh", **volume_model_metadata(config, model)
    )
    return ModelBundle(model, meta)


@pytest.fixture(scope="module")
def trained(baseline):
    """A tiny U-Net trained on the baseline until it segments it (its own training data)."""
    config = VolumeTrainingConfig(iterations=120, **QUICK)
    model = new_volume_model((1, 1), width=4, seed=0)
    losses = train_volume_model(model, [baseline], config, device="cpu")
    return volume_bundle(model, config), losses


def test_unet_shapes_and_size_check():
    model = UNet3D((1, 1), width=2, depth=4).eval()
    assert model.size_multiple == 16
    assert model(torch.zeros(1, 2, 32, 48, 32)).shape == (1, 2, 32, 48, 32)
    with pytest.raises(ValueError, match="multiple of 16 and at least 32"):
        model(torch.zeros(1, 2, 32, 40, 32))
    with pytest.raises(ValueError, match="multiple of 16 and at least 32"):
        model(torch.zeros(1, 2, 16, 32, 32))
    with pytest.raises(ValueError, match="2, D, H, W"):
        model(torch.zeros(1, 1, 32, 32, 32))
    # four down-sampling blocks, four up-sampling blocks
    assert len(model.encoder) == 5 and len(model.up) == 4 and len(model.decoder) == 4


@pytest.mark.parametrize(
    "strategy, trained_prefixes",
    [
        ("head", ("final.",)),
        ("last-layers", ("decoder.3.", "final.")),
        ("decoder", ("up.", "decoder.", "final.")),
        ("all", ("encoder.", "up.", "decoder.", "final.")),
    ],
)
def test_each_strategy_trains_exactly_its_layers(baseline, strategy, trained_prefixes):
    model = new_volume_model((1, 1), width=2, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_volume_model(model, [baseline], VolumeTrainingConfig(iterations=2, strategy=strategy, **QUICK), device="cpu")
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if k.startswith(trained_prefixes)}


def test_reset_last_layers_replaces_only_the_last_three_layers():
    model = new_volume_model((1,), width=2, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    model.reset_last_layers()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"decoder.3.0.weight", "decoder.3.3.weight", "final.weight"} <= changed
    assert all(k.startswith(("decoder.3.", "final.")) for k in changed)
    with pytest.raises(ValueError, match="unknown strategy"):
        model.trainable_modules("encoder")


def test_patch_sampler_balances_lesion_and_background_and_is_seeded(baseline):
    config = VolumeTrainingConfig(**QUICK | {"batch_size": 16})
    patch = config.patch_voxels(16)
    assert patch == 32 and VolumeTrainingConfig().patch_voxels(16) == 48  # 96 mm at 2 mm
    volumes = prepare_volumes([baseline], (2.0,) * 3, patch)
    x, y = sample_volume_batch(volumes, config, patch, iteration=0)
    assert x.shape == (16, 2, 32, 32, 32) and y.shape == (16, 32, 32, 32)
    with_lesion = int((y.sum(dim=(1, 2, 3)) > 0).sum())
    assert 3 <= with_lesion <= 13  # about half, none of the others holds lesion by construction
    x2, y2 = sample_volume_batch(volumes, config, patch, iteration=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(sample_volume_batch(volumes, config, patch, iteration=1)[0], x)


def test_windows_cover_the_axis_with_half_overlap():
    assert window_starts(32, 32) == [0]
    assert window_starts(80, 32) == [0, 16, 32, 48]
    starts = window_starts(90, 32)
    assert starts[-1] == 58 and all(b - a <= 16 for a, b in zip(starts, starts[1:]))


def test_training_learns_and_prediction_is_on_the_case_grid(baseline, trained):
    bundle, losses = trained
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])
    probability = predict_probability(bundle, baseline, device="cpu")
    assert probability.shape == baseline.organ.shape
    assert np.all(probability[~baseline.organ] == 0) and probability.max() <= 1
    assert dice(probability > 0.5, baseline.lesions) > 0.3


def test_same_seed_same_model(baseline):
    models = []
    for _ in range(2):
        model = new_volume_model((1, 1), width=2, seed=3)
        train_volume_model(model, [baseline], VolumeTrainingConfig(iterations=3, **QUICK), device="cpu")
        models.append(model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_model_file_round_trip_and_mc_dropout(baseline, trained, tmp_path):
    bundle, _ = trained
    save_model(bundle, tmp_path / "unet.pt")
    loaded = load_model(tmp_path / "unet.pt")
    assert loaded.is_volume_model and loaded.metadata["architecture"]["type"] == "unet3d"
    assert np.array_equal(
        predict_probability(loaded, baseline, device="cpu"), predict_probability(bundle, baseline, device="cpu")
    )
    probability, uncertainty = predict_with_uncertainty(loaded, baseline, n_samples=3, seed=1, device="cpu")
    again = predict_with_uncertainty(loaded, baseline, n_samples=3, seed=1, device="cpu")[1]
    assert np.array_equal(uncertainty.sd, again.sd) and uncertainty.sd.max() > 0
    assert np.all(uncertainty.sd[~baseline.organ] == 0)
    result = segment_case(loaded, baseline, mc_samples=2, device="cpu")
    assert result.mask.shape == baseline.organ.shape and set(result.summary) == {"mean_sd_in_lesions", "max_sd"}
    with pytest.raises(ModelFileError, match="unknown network type"):
        build_network({"type": "transformer"})
    with pytest.raises(ValueError, match="patch_voxels"):
        make_metadata(bundle.model, SEQUENCES, (2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="needs 3 values"):
        make_metadata(bundle.model, SEQUENCES, (2.0, 2.0), patch_voxels=32)


def test_finetuning_a_unet_keeps_the_base_and_checks_the_selection(baseline, trained):
    bundle, _ = trained
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    patient = finetune_patient_model(
        bundle, baseline, config=FinetuneConfig(iterations=2, layers="decoder"), device="cpu"
    )
    assert patient.metadata["finetune"]["strategy"] == "decoder"
    assert all(torch.equal(bundle.model.state_dict()[k], v) for k, v in before.items())
    after = patient.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("encoder."))
    assert not torch.equal(after["final.weight"], before["final.weight"])
    with pytest.raises(ValueError, match="whole annotated baseline volume"):
        finetune_patient_model(bundle, baseline, "suggested:2", FinetuneConfig(iterations=1), device="cpu")
    with pytest.raises(ValueError, match="without it"):
        finetune_patient_model(
            bundle, baseline, config=FinetuneConfig(iterations=1, weighting="segmentation"), device="cpu"
        )
    with pytest.raises(ValueError, match="every voxel"):  # the pixel fraction is the 2D head's
        finetune_patient_model(
            bundle, baseline, config=FinetuneConfig(iterations=1, layers="decoder", pixel_fraction=0.25), device="cpu"
        )
    transferred = finetune_volume_model(
        bundle,
        [baseline],
        VolumeTrainingConfig(iterations=1, strategy="all", reset_last_layers=True, spacing_mm=1.5),
        device="cpu",
    )
    # the model's own spacing and window win over the configuration's
    assert transferred.metadata["finetune"]["config"]["spacing_mm"] == 2.0


def test_predicting_leaves_the_callers_unet_in_its_mode(baseline, trained):
    """The 3D path, as the 2D one: the caller's model keeps training mode and weights (the
    old code switched it to eval)."""
    bundle, _ = trained
    bundle.model.train()
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    try:
        predict_probability(bundle, baseline, device="cpu")
        predict_with_uncertainty(bundle, baseline, n_samples=2, device="cpu")
        assert all(m.training for m in bundle.model.modules())
        assert all(torch.equal(v, before[k]) for k, v in bundle.model.state_dict().items())
    finally:
        bundle.model.eval()
