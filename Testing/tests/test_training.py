import copy

import numpy as np
import pytest
import torch

from PatientFineTuneLib.cases import find_cases
from PatientFineTuneLib.images import load_case, prepare_case
from PatientFineTuneLib.runtime import Cancelled
from PatientFineTuneLib.training import (
    TrainingConfig,
    build_patch_pool,
    checkpoint_weights,
    sample_batch,
    train_base_model,
)

from conftest import tiny_model

SPACING = (2.0, 2.0)


@pytest.fixture(scope="module")
def cases(small_pair_dir):
    files = find_cases(small_pair_dir, ["FLAIR", "T1"])
    return [prepare_case(load_case(f.sequences, f.organ, f.lesions, name=f.name)) for f in files]


def test_only_lesion_slices_are_used_with_patches_in_the_organ(cases):
    pool = build_patch_pool(cases, SPACING, 25, seed=0)
    assert len(pool) == sum(len(c.lesion_slices()) for c in cases)
    assert all(lab.sum() > 0 for lab in pool.labels)
    assert all(c.shape == (25, 2) for c in pool.centres)


def test_batches_are_reproducible_and_labels_follow_images(cases):
    pool = build_patch_pool(cases, SPACING, 25, seed=0)
    config = TrainingConfig(patch_size=64, seed=5)
    x1, y1 = sample_batch(pool, config, iteration=3)
    x2, y2 = sample_batch(pool, config, iteration=3)
    x3, _ = sample_batch(pool, config, iteration=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape == (4, 2, 64, 64) and y1.shape == (4, 64, 64) and y1.dtype == torch.long
    # lesions are FLAIR-bright: labelled pixels are brighter than the rest of the patches
    flair = x1[:, 0]
    if (y1 == 1).any():
        assert flair[y1 == 1].mean() > flair[(y1 == 0) & (flair != 0)].mean()


def _train(cases, iterations, tmp_path=None, resume=False, seed=0, cancel=None, weight_average_decay=0.0):
    model = tiny_model(seed=seed).train()
    config = TrainingConfig(iterations=iterations, patch_size=64, seed=seed, weight_average_decay=weight_average_decay)
    ckpt = tmp_path / "ckpt.pt" if tmp_path else None
    history = train_base_model(
        model,
        cases,
        SPACING,
        config,
        device="cpu",
        checkpoint_path=ckpt,
        checkpoint_every=2,
        resume=resume,
        progress=False,
        log=lambda m: None,
        cancel=cancel,
    )
    return model, history


def test_training_changes_weights_and_is_deterministic(cases):
    before = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    a, history = _train(cases, 3)
    b, _ = _train(cases, 3)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], before[k]) for k in sa if sa[k].is_floating_point())


def test_resume_continues_exactly_like_an_uninterrupted_run(cases, tmp_path):
    straight, _ = _train(cases, 4)
    _train(cases, 2, tmp_path)
    resumed, history = _train(cases, 4, tmp_path, resume=True)
    assert [h["iteration"] for h in history] == [3, 4]
    s1, s2 = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(s1[k].float(), s2[k].float(), atol=1e-6) for k in s1)


def test_a_cancelled_run_keeps_its_steps_since_the_last_checkpoint(cases, tmp_path):
    # a deadline (train_anatomy.py --hours) falls between checkpoints: the run stops after
    # 3 steps with checkpoints every 2, and its resumption starts at step 3, not 2
    straight, _ = _train(cases, 4)
    cancel_before = iter([False, False, False, True])
    with pytest.raises(Cancelled):
        _train(cases, 4, tmp_path, cancel=lambda: next(cancel_before))
    resumed, history = _train(cases, 4, tmp_path, resume=True)
    assert [h["iteration"] for h in history] == [4]
    s1, s2 = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(s1[k].float(), s2[k].float(), atol=1e-6) for k in s1)


def test_weight_averaging_keeps_an_exponential_average_and_validates_it(cases):
    """With ``weight_average_decay`` the run keeps avg <- d * avg + (1 - d) * weights after
    every step, starting from the weights it starts with; validation scores the average (the
    model holds it while ``on_validation`` runs) and the trained model ends holding it."""
    model = tiny_model().train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    after_each_step, validated = [], []
    history = train_base_model(
        model,
        cases,
        SPACING,
        TrainingConfig(iterations=3, patch_size=64, weight_average_decay=0.5),
        val_cases=cases[:1],
        device="cpu",
        validate_every=3,
        progress=False,
        log=lambda m: None,
        on_step=lambda r: after_each_step.append({k: v.clone() for k, v in model.state_dict().items()}),
        on_validation=lambda r: validated.append({k: v.clone() for k, v in model.state_dict().items()}),
    )
    expected = dict(start)
    for weights in after_each_step:
        expected = {k: 0.5 * expected[k] + 0.5 * w if w.is_floating_point() else w for k, w in weights.items()}
    floating = [k for k in expected if expected[k].is_floating_point()]
    ended = model.state_dict()
    assert all(torch.allclose(ended[k], expected[k], atol=1e-6) for k in expected)
    assert len(validated) == 1 and all(torch.allclose(validated[0][k], expected[k], atol=1e-6) for k in expected)
    # the average is not the last step's weights, and validation did not disturb the training
    assert any(not torch.allclose(after_each_step[-1][k], expected[k], atol=1e-6) for k in floating)
    assert "val_dice" in history[-1]


def test_a_weight_averaged_run_resumes_exactly_from_any_stop(cases, tmp_path):
    straight, _ = _train(cases, 4, weight_average_decay=0.5)
    cancel_before = iter([False, False, False, True])
    with pytest.raises(Cancelled):
        _train(cases, 4, tmp_path, cancel=lambda: next(cancel_before), weight_average_decay=0.5)
    payload = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert payload["iteration"] == 3 and set(payload["averaged_model"]) == set(payload["model"])
    # what the run stands for (its export, a new run's --init-from) is the average
    assert checkpoint_weights(payload) is payload["averaged_model"]
    resumed, history = _train(cases, 4, tmp_path, resume=True, weight_average_decay=0.5)
    assert [h["iteration"] for h in history] == [4]
    s1, s2 = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(s1[k].float(), s2[k].float(), atol=1e-6) for k in s1)


def test_weight_averaging_is_a_setting_of_the_run_and_old_checkpoints_still_resume(cases, tmp_path):
    # a run without averaging records no such setting, as checkpoints from before it existed
    assert "weight_average_decay" not in TrainingConfig().identity()
    _train(cases, 2, tmp_path)
    with pytest.raises(ValueError, match=r"weight_average_decay: \(not recorded\) in the checkpoint, 0.5 now"):
        _train(cases, 4, tmp_path, resume=True, weight_average_decay=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        TrainingConfig(weight_average_decay=1.0)


def test_resume_with_other_settings_is_refused(cases, tmp_path):
    _train(cases, 2, tmp_path)
    with pytest.raises(ValueError, match="different settings") as refused:
        _train(cases, 4, tmp_path, resume=True, seed=1)
    # the refusal names the setting, so the user knows which option to give back
    assert "seed: 0 in the checkpoint, 1 now" in str(refused.value)


def test_validation_dice_is_reported_and_cancel_stops(cases):
    model = tiny_model().train()
    config = TrainingConfig(iterations=2, patch_size=64)
    history = train_base_model(
        model,
        cases[:1],
        SPACING,
        config,
        val_cases=cases[1:],
        device="cpu",
        validate_every=2,
        progress=False,
        log=lambda m: None,
    )
    assert 0.0 <= history[-1]["val_dice"] <= 1.0
    with pytest.raises(Cancelled):
        train_base_model(
            model, cases, SPACING, config, device="cpu", progress=False, log=lambda m: None, cancel=lambda: True
        )


def test_validation_scores_post_process_as_the_preset_does(cases):
    """Validation scores what the trained model will deliver: a liver model's segmentations
    get the preset's per-slice opening, so its validation Dice and lesion F1 must too."""
    from PatientFineTuneLib.inference import segment_case
    from PatientFineTuneLib.metrics import dice, lesion_detection
    from PatientFineTuneLib.modelfile import ModelBundle
    from PatientFineTuneLib.training import validation_scores

    torch.manual_seed(3)
    model = tiny_model().eval()
    case = cases[0]
    scored = {}
    for preset in ("liver-metastases", "brain-wmh"):
        delivered = segment_case(
            ModelBundle(model, {"training_spacing_mm": list(SPACING), "preset": preset}), case, device="cpu"
        ).mask
        scored[preset] = dice(delivered, case.lesions)
        scores = validation_scores(model, [case], SPACING, "cpu", preset=preset)
        assert scores["dice"] == pytest.approx(scored[preset], abs=1e-9)
        assert scores["lesion_f1"] == pytest.approx(lesion_detection(delivered, case.lesions)["lesion_f1"], abs=1e-9)
    assert scored["liver-metastases"] != scored["brain-wmh"]  # the opening changes this model's result


def test_cases_without_lesions_are_refused(cases):
    case = cases[0]
    case_no_lesions = type(case)(case.images, case.organ, None, case.grid, case.layout, "x")
    with pytest.raises(ValueError, match="no lesion mask"):
        build_patch_pool([case_no_lesions], SPACING, 5, 0)


def _train_with(cases, **settings):
    model = tiny_model().train()
    config = TrainingConfig(iterations=3, patch_size=64, **settings)
    history = train_base_model(model, cases, SPACING, config, device="cpu", progress=False, log=lambda m: None)
    return model.state_dict(), [h["loss"] for h in history]


def test_channels_last_and_mixed_precision_train_the_same_network(cases):
    reference, ref_losses = _train_with(cases)
    channels_last, cl_losses = _train_with(cases, channels_last=True)
    amp, amp_losses = _train_with(cases, precision="amp")
    amp_channels_last, amp_cl_losses = _train_with(cases, precision="amp", channels_last=True)
    # channels-last only changes memory layout: same numbers up to summation order. Adam
    # moves a weight by about the learning rate (1e-4) whatever the gradient's size, so a
    # rounding-level gradient difference can move a weight by 2e-4 over three steps.
    assert np.allclose(cl_losses, ref_losses, rtol=1e-4)
    assert all(torch.allclose(channels_last[k].float(), reference[k].float(), atol=1e-3) for k in reference)
    # bfloat16 autocast on CPU: close to fp32, but really computed in lower precision
    assert np.allclose(amp_losses, ref_losses, rtol=0.05) and amp_losses != ref_losses
    assert all(torch.isfinite(v).all() for v in amp.values() if v.is_floating_point())
    # both together (refused until 2026-12-07 for non-finite weights that torch 2.13 no
    # longer gives on any oneDNN code path: docs/benchmarks.md)
    assert np.allclose(amp_cl_losses, ref_losses, rtol=0.05)
    assert all(torch.isfinite(v).all() for v in amp_channels_last.values() if v.is_floating_point())


def test_unsupported_precision_settings_are_refused():
    from PatientFineTuneLib.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="precision must be one of fp32, amp, auto"):
        TrainingConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of fp32, amp, auto"):
        FinetuneConfig(large_annotation={"precision": "bf16"})


def test_auto_precision_is_bfloat16_only_where_the_cpu_multiplies_it_in_amx_tiles():
    from PatientFineTuneLib.training_loop import resolved_precision

    amx = torch.cpu._is_amx_tile_supported()
    assert resolved_precision("auto", "cpu") == ("amp" if amx else "fp32")
    assert resolved_precision("auto", "cuda") == "fp32"  # float32 on a GPU until one measures it
    assert [resolved_precision(p, "cpu") for p in ("fp32", "amp")] == ["fp32", "amp"]
    with pytest.raises(ValueError, match="precision must be one of"):
        resolved_precision("bf16", "cpu")


def test_resume_with_other_precision_is_refused(cases, tmp_path):
    _train(cases, 2, tmp_path)
    model = tiny_model().train()
    config = TrainingConfig(iterations=4, patch_size=64, precision="amp")
    with pytest.raises(ValueError, match="precision: 'fp32' in the checkpoint, 'amp' now"):
        train_base_model(
            model,
            cases,
            SPACING,
            config,
            device="cpu",
            checkpoint_path=tmp_path / "ckpt.pt",
            resume=True,
            progress=False,
            log=lambda m: None,
        )


@pytest.mark.parametrize("loop", ["base training", "fine-tuning", "U-Net training"])
def test_every_training_loop_stops_on_a_non_finite_loss_before_changing_weights(cases, loop):
    """One optimiser step serves the three loops: a NaN in the inputs makes the loss
    non-finite, and each stops with the same clear error, the weights untouched."""

    from PatientFineTuneLib.finetune import FinetuneConfig, finetune_patient_model
    from PatientFineTuneLib.modelfile import ModelBundle, make_metadata
    from PatientFineTuneLib.volume_training import VolumeTrainingConfig, new_volume_model, train_volume_model

    poisoned = copy.deepcopy(cases[0])
    poisoned.images[:] = np.nan  # every patch and volume crop sees it
    if loop == "base training":
        model = tiny_model()
        before = copy.deepcopy(model.state_dict())
        run = lambda: train_base_model(  # noqa: E731
            model, [poisoned], SPACING, TrainingConfig(iterations=2, batch_size=2, patch_size=32, seed=0), device="cpu"
        )
    elif loop == "fine-tuning":
        model = tiny_model()
        before = copy.deepcopy(model.state_dict())
        bundle = ModelBundle(
            model, make_metadata(model, [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}], SPACING)
        )
        run = lambda: finetune_patient_model(
            bundle, poisoned, "all-lesion", FinetuneConfig(iterations=2, method="naive"), device="cpu"
        )  # noqa: E731
    else:
        model = new_volume_model([1, 1], width=4, depth=2)
        before = copy.deepcopy(model.state_dict())
        run = lambda: train_volume_model(  # noqa: E731
            model,
            [poisoned],
            VolumeTrainingConfig(iterations=2, batch_size=1, patch_mm=32.0, spacing_mm=4.0),
            device="cpu",
        )
    with pytest.raises(RuntimeError, match="training diverged \\(non-finite loss\\)"):
        run()
    after = model.state_dict()
    assert all(
        torch.equal(before[k], after[k])
        for k in before
        if before[k].dtype.is_floating_point and "running" not in k and "num_batches" not in k
    )


@pytest.mark.parametrize("loop", ["fine-tuning, cached features", "fine-tuning, live features", "U-Net training"])
def test_fine_tuning_and_unet_training_run_in_mixed_precision_like_base_training(cases, loop):
    """The one training loop gives every caller mixed precision: bfloat16 autocast on a
    CPU trains close to fp32 (same seed) but is really computed in lower precision."""
    from PatientFineTuneLib.finetune import FinetuneConfig, finetune_patient_model
    from PatientFineTuneLib.modelfile import ModelBundle, make_metadata
    from PatientFineTuneLib.volume_training import VolumeTrainingConfig, new_volume_model, train_volume_model

    def run(precision):
        if loop.startswith("fine-tuning"):
            model = tiny_model()
            bundle = ModelBundle(
                model, make_metadata(model, [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}], SPACING)
            )
            method = "fast" if "cached" in loop else "naive"
            losses = []
            patient = finetune_patient_model(
                bundle,
                cases[0],
                "all-lesion",
                FinetuneConfig(iterations=3, method=method, precision=precision),
                device="cpu",
                progress=lambda i, loss: losses.append(loss),
            )
            return patient.model.state_dict(), losses
        model = new_volume_model([1, 1], width=4, depth=2)
        losses = train_volume_model(
            model,
            [cases[0]],
            VolumeTrainingConfig(iterations=3, batch_size=1, patch_mm=32.0, spacing_mm=4.0, precision=precision),
            device="cpu",
        )
        return model.state_dict(), losses

    reference, ref_losses = run("fp32")
    amp, amp_losses = run("amp")
    assert np.allclose(amp_losses, ref_losses, rtol=0.05) and amp_losses != ref_losses
    assert all(torch.isfinite(v).all() for v in amp.values() if v.is_floating_point())
    assert any(not torch.equal(amp[k], reference[k]) for k in reference if reference[k].is_floating_point())


def test_adam_takes_the_steps_of_torch_optim_adam_and_shares_its_checkpoints(cases):
    from PatientFineTuneLib.runtime import optimiser_step
    from PatientFineTuneLib.training import patch_loss
    from PatientFineTuneLib.training_loop import Adam

    config = TrainingConfig(patch_size=64, seed=0)
    pool = build_patch_pool(cases, SPACING, 5, seed=0)

    def start(optimiser_class, model=None):
        model = copy.deepcopy(model) if model is not None else tiny_model(seed=0).train()
        model.pathways[0].blocks[0][0][0].weight.requires_grad_(False)  # a frozen layer: no gradient, no state
        return model, optimiser_class(list(model.parameters()), lr=1e-3)

    def train(model, optimiser, iterations):
        loss_of = patch_loss(model, pool, config, torch.device("cpu"))
        for iteration in iterations:
            torch.manual_seed(iteration)
            optimiser_step(optimiser, loss_of(iteration))

    def assert_same(a, b):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name

    ours, theirs = start(Adam), start(torch.optim.Adam)
    for model, optimiser in (ours, theirs):
        train(model, optimiser, range(3))
    assert_same(ours[0], theirs[0])
    assert torch.equal(
        ours[0].pathways[0].blocks[0][0][0].weight, tiny_model(seed=0).pathways[0].blocks[0][0][0].weight
    )
    assert not torch.equal(ours[0].classifier[1].weight, tiny_model(seed=0).classifier[1].weight)
    # each continues from the other's checkpointed state (a copy, as torch.save writes it) exactly as from its own
    ours_from_theirs, theirs_from_ours = start(Adam, theirs[0]), start(torch.optim.Adam, ours[0])
    ours_from_theirs[1].load_state_dict(copy.deepcopy(theirs[1].state_dict()))
    theirs_from_ours[1].load_state_dict(copy.deepcopy(ours[1].state_dict()))
    for model, optimiser in (ours, theirs, ours_from_theirs, theirs_from_ours):
        train(model, optimiser, range(3, 5))
    for other in (theirs, ours_from_theirs, theirs_from_ours):
        assert_same(ours[0], other[0])
    with pytest.raises(ValueError, match="optimiser state for"):
        Adam(list(ours[0].parameters())[:3]).load_state_dict(ours[1].state_dict())


def test_adam_steps_through_the_gradient_scaler_of_float16_training():
    """On CUDA float16 training steps through torch.amp.GradScaler (runtime.optimiser_step):
    it unscales the library's Adam's gradients and skips the step on an inf (CPU scaler here)."""
    from PatientFineTuneLib.runtime import optimiser_step
    from PatientFineTuneLib.training_loop import Adam

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    optimiser, scaler = Adam(layer.parameters(), lr=0.1), torch.amp.GradScaler("cpu", init_scale=1024.0)
    reference = copy.deepcopy(layer)
    reference_optimiser = torch.optim.Adam(reference.parameters(), lr=0.1)
    x, start = torch.randn(8, 4), layer.weight.detach().clone()
    optimiser_step(optimiser, layer(x).pow(2).mean(), scaler)
    optimiser_step(reference_optimiser, reference(x).pow(2).mean())  # unscaled: the same step
    assert torch.allclose(layer.weight, reference.weight, atol=1e-6) and not torch.equal(layer.weight, start)
    before = layer.weight.detach().clone()
    scaler.scale(layer(torch.full((8, 4), float("inf"))).mean()).backward()
    scaler.step(optimiser)
    scaler.update()
    assert torch.equal(layer.weight, before) and scaler.get_scale() == 512.0


def test_a_finished_checkpoint_keeps_its_model_in_under_half_the_size_and_refuses_to_go_on(cases, tmp_path):
    """A run's checkpoint, once the run is done, drops Adam's moments (two tensors per
    weight) so the committed checkpoints leave room for a GPU call's data: its model is
    unchanged, a resume that has nothing left to do still works, and one that would go on
    is refused with what to do instead (it could no longer continue exactly)."""
    from PatientFineTuneLib.training import finish_checkpoint

    trained, _ = _train(cases, 2, tmp_path)
    ckpt = tmp_path / "ckpt.pt"
    full = ckpt.stat().st_size
    finish_checkpoint(ckpt)
    assert ckpt.stat().st_size < 0.5 * full
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert payload["iteration"] == 2 and payload["optimizer"] is None
    assert all(torch.equal(payload["model"][k], v) for k, v in trained.state_dict().items())

    again, history = _train(cases, 2, tmp_path, resume=True)
    assert history == [] and all(torch.equal(again.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["optimizer"] is None  # not saved again
    with pytest.raises(ValueError, match="finished run.*new run started from its weights"):
        _train(cases, 4, tmp_path, resume=True)
    with pytest.raises(ValueError, match="stands at 2 iterations, not 4"):
        finish_checkpoint(ckpt, 4)
