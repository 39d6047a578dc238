import numpy as np
import pytest
import torch
from torch import nn

from PatientFineTuneLib.model import (
    PAPER_DILATIONS,
    ByteDropout,
    LesionNet,
    count_parameters,
    inference_copy,
    keep_mask,
)

from conftest import tiny_model


def rf_from_layers(module: nn.Module) -> int:
    """Receptive field of a chain of stride-1 convolutions, walked independently."""
    rf, jump = 1, 1
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            assert m.stride == (1, 1)
            rf += (m.kernel_size[0] - 1) * m.dilation[0] * jump
    return rf


def test_paper_receptive_field_is_123():
    model = LesionNet((1, 1))
    assert rf_from_layers(model.pathways[0]) == 123
    assert model.receptive_field() == 123
    assert 1 + 2 * sum(sum(b) for b in PAPER_DILATIONS) == 123


def test_receptive_field_matches_what_each_block_sees():
    """The input region that influences one output pixel, found by back-propagation,
    grows block by block exactly as 1 + 2 * (sum of dilations so far), ending at 123."""
    torch.manual_seed(0)
    model = LesionNet((1,), width=16).double().eval()
    size, centre = 131, 65
    x = torch.randn(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    reach = 0
    for block_dilations, output in zip(PAPER_DILATIONS, model.pathways[0](x)):
        reach += sum(block_dilations)
        (grad,) = torch.autograd.grad(output[0, :, centre, centre].sum(), x, retain_graph=True)
        cols = np.flatnonzero(grad[0, 0].abs().sum(axis=0).numpy() > 0)
        rows = np.flatnonzero(grad[0, 0].abs().sum(axis=1).numpy() > 0)
        assert (cols.min(), cols.max()) == (centre - reach, centre + reach)
        assert (rows.min(), rows.max()) == (centre - reach, centre + reach)
    assert 2 * reach + 1 == model.receptive_field() == 123


def test_layer_layout_matches_the_paper():
    model = LesionNet((1, 1))
    for pathway in model.pathways:
        convs = [m for m in pathway.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 13
        assert [len(block) for block in pathway.blocks] == [2, 2, 3, 3, 3]
        assert all(c.kernel_size == (3, 3) and c.out_channels == 64 for c in convs)
        assert [c.dilation[0] for c in convs] == [d for block in PAPER_DILATIONS for d in block]
        assert sum(1 for c in convs if c.dilation[0] > 1) == 11
        bns = [m for m in pathway.modules() if isinstance(m, nn.BatchNorm2d)]
        relus = [m for m in pathway.modules() if isinstance(m, nn.ReLU)]
        assert len(bns) == len(relus) == 13
    head = list(model.classifier)
    kinds = [type(m) for m in head]
    assert kinds == [ByteDropout, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, ByteDropout, nn.Conv2d]
    assert all(isinstance(m, nn.Dropout) for m in (head[0], head[4]))
    assert head[0].p == head[4].p == 0.2
    assert (head[1].in_channels, head[1].out_channels, head[1].kernel_size) == (640, 128, (1, 1))
    assert (head[5].in_channels, head[5].out_channels, head[5].kernel_size) == (128, 2, (1, 1))


def test_parameter_count_from_the_architecture():
    model = LesionNet((1, 1))
    per_pathway = (1 * 9 * 64 + 2 * 64) + 12 * (64 * 9 * 64 + 2 * 64)  # conv (no bias) + BN
    head = 640 * 128 + 2 * 128 + 128 * 2 + 2
    assert count_parameters(model) == 2 * per_pathway + head
    liver = LesionNet((16, 3))
    assert liver.feature_channels == 640
    assert count_parameters(liver) == count_parameters(model) + (16 - 1) * 9 * 64 + (3 - 1) * 9 * 64


def test_features_then_head_equals_forward_and_keeps_size():
    model = tiny_model((16, 3))
    x = torch.randn(2, 19, 40, 36)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 2, 40, 36)
        features = model.features(x)
        assert features.shape == (2, 2 * 5 * 4, 40, 36)
        assert torch.equal(model.head(features), logits)


def test_pathways_see_only_their_own_channels():
    model = tiny_model((1, 1))
    x = torch.randn(1, 2, 32, 32)
    y = x.clone()
    y[:, 1] += 5.0  # change the second sequence only
    with torch.no_grad():
        fx, fy = model.features(x), model.features(y)
    first = 5 * model.width
    assert torch.equal(fx[:, :first], fy[:, :first])
    assert not torch.equal(fx[:, first:], fy[:, first:])


def test_he_uniform_initialisation_bounds():
    model = LesionNet((1, 1), width=16)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            bound = np.sqrt(6.0 / fan_in)
            w = m.weight.detach()
            assert w.abs().max() <= bound + 1e-6
            assert w.abs().max() > 0.8 * bound  # uniform fills the range


def test_wrong_input_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 2"):
        tiny_model((1, 1))(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError):
        LesionNet(())


def test_byte_dropout_rate_scale_and_seeding():
    drop = ByteDropout(0.2).train()
    x = torch.ones(1, 64, 128, 128)
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    assert torch.equal(a, drop(x))  # masks follow torch.manual_seed
    dropped = (a == 0).float().mean().item()
    assert dropped == pytest.approx(51 / 256, abs=0.005)
    values = a.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(256 / 205)
    assert a.mean().item() == pytest.approx(1.0, abs=0.01)  # expectation preserved
    assert torch.equal(drop.eval()(x), x)


def test_keep_mask_rate_seeding_and_buffer():
    a = keep_mask((1000, 640), 51, [7, 3])
    assert a.dtype == torch.float32 and set(a.unique().tolist()) == {0.0, 1.0}
    assert 1 - a.mean().item() == pytest.approx(51 / 256, abs=0.003)
    assert torch.equal(a, keep_mask((1000, 640), 51, [7, 3]))  # the seed fixes the mask
    assert not torch.equal(a, keep_mask((1000, 640), 51, [7, 4]))
    buffer = torch.full((1000, 640), 5.0)
    assert keep_mask((1000, 640), 51, [7, 3], out=buffer) is buffer and torch.equal(buffer, a)


def test_head_overwrites_features_only_when_allowed():
    model = LesionNet((1, 1), width=2, head_width=4).train()
    features = torch.randn(2, model.feature_channels, 6, 6).contiguous(memory_format=torch.channels_last)
    original = features.clone()
    torch.manual_seed(3)
    fresh = model.head(features)
    assert torch.equal(features, original)
    torch.manual_seed(3)
    assert torch.equal(model.head(features, overwrite=True), fresh)  # same masks, same result
    assert not torch.equal(features, original)  # the first dropout wrote into the caller's buffer
    recorded = original.clone().requires_grad_()
    model.head(recorded, overwrite=True).sum().backward()
    assert torch.equal(recorded.detach(), original)  # never while autograd records


def test_head_rows_with_explicit_masks_is_the_module_arithmetic():
    """head_rows with given masks computes drop -> conv -> BN -> ReLU -> drop -> conv
    exactly as the layers would, masks broadcast over pixels."""
    model = LesionNet((1, 1), width=3, head_width=8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        rows = torch.randn(50, model.feature_channels)
        keep1 = (torch.rand(1, model.feature_channels) > 0.2).float()
        keep2 = (torch.rand(1, model.head_width) > 0.2).float()
        drop1, conv1, norm, relu, drop2, conv2 = model.classifier
        x = (rows * keep1 * drop1.scale)[:, :, None, None]
        expected = conv2(relu(norm(conv1(x))) * keep2[:, :, None, None] * drop2.scale)[:, :, 0, 0]
        assert torch.allclose(model.head_rows(rows, keep=(keep1, keep2)), expected, atol=1e-5)


def test_inference_copy_folds_batchnorm_and_leaves_the_model_alone():
    model = LesionNet((1, 1), width=4, head_width=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 2, 40, 40)
    with torch.no_grad():
        assert torch.allclose(folded(x), model.eval()(x), atol=1e-4)
