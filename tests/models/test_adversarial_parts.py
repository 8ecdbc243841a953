"""Discriminators, transfer layers and generators of the adversarial methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdray.errors import ConfigError
from kdray.models import count_params
from kdray.models.discriminators import FeatureDiscriminator, ProbDiscriminator
from kdray.models.generators import DFADGenerator, ResidualImageGenerator
from kdray.models.transfer import TransferLayer, make_transfer


# ---------------------------------------------------------------------------------------------------- transfer
def test_transfer_layer_maps_channels_and_halves_the_size_with_a_strided_conv() -> None:
    layer = TransferLayer((16, 8, 8), (64, 4, 4))
    assert layer(torch.randn(2, 16, 8, 8)).shape == (2, 64, 4, 4)
    assert layer.conv.kernel_size == (3, 3) and layer.conv.stride == (2, 2)
    assert isinstance(layer.pool, nn.Identity)
    assert count_params(layer) == 16 * 64 * 9 + 2 * 64


def test_transfer_layer_same_size_is_1x1_and_odd_sizes_pool() -> None:
    same = TransferLayer((32, 8, 8), (16, 8, 8))
    assert same.conv.kernel_size == (1, 1)
    assert same(torch.randn(2, 32, 8, 8)).shape == (2, 16, 8, 8)
    odd = TransferLayer((64, 7, 7), (32, 4, 4))  # 7 -> 4 is no integer stride
    assert isinstance(odd.pool, nn.AdaptiveAvgPool2d)
    out = odd(torch.randn(2, 64, 7, 7))
    assert out.shape == (2, 32, 4, 4) and (out >= 0).all()


def test_transfer_layer_refuses_to_upsample() -> None:
    with pytest.raises(ConfigError) as err:
        TransferLayer((64, 4, 4), (64, 8, 8))
    assert err.value.key == "method.transfer"


def test_make_transfer_modes() -> None:
    assert isinstance(make_transfer((64, 8, 8), (64, 8, 8), "auto"), nn.Identity)
    assert isinstance(make_transfer((16, 8, 8), (64, 4, 4), "auto"), TransferLayer)
    assert isinstance(make_transfer((64, 8, 8), (64, 8, 8), "always"), TransferLayer)
    assert isinstance(make_transfer((64, 8, 8), (64, 8, 8), "off"), nn.Identity)
    with pytest.raises(ConfigError) as err:
        make_transfer((16, 8, 8), (64, 4, 4), "off")
    assert err.value.key == "method.transfer" and err.value.value == "off"
    assert "'auto' or 'always'" in err.value.accepted and "(16, 8, 8)" in err.value.accepted
    with pytest.raises(ConfigError, match="auto, always, off"):
        make_transfer((64, 8, 8), (64, 8, 8), "sometimes")


# ---------------------------------------------------------------------------------------------- discriminators
@pytest.mark.parametrize("shape", [(64, 8, 8), (64, 7, 7), (512, 2, 2), (128, 1, 1)])
def test_feature_discriminator_scores_each_sample(shape: tuple[int, int, int]) -> None:
    disc = FeatureDiscriminator(shape[0], hidden=16)
    score = disc(torch.randn(2, *shape))
    assert score.shape == (2,)
    score.sum().backward()
    assert disc.convs[0].weight.grad.abs().sum() > 0


def _score_with_strides(
    disc: FeatureDiscriminator, x: torch.Tensor, strides: tuple[int, ...]
) -> torch.Tensor:
    for conv, norm, stride in zip(disc.convs, disc.norms, strides):
        x = nn.functional.leaky_relu(norm(nn.functional.conv2d(x, conv.weight, conv.bias, stride, 1)), 0.2)
    return disc.fc(x.mean((2, 3))).squeeze(1)


def test_feature_discriminator_strides_only_maps_of_at_least_4x4() -> None:
    torch.manual_seed(0)
    disc = FeatureDiscriminator(8, hidden=4, n_layers=3).eval()
    big, small = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(disc(big), _score_with_strides(disc, big, (2, 2, 1)))  # 8 -> 4 -> 2 -> 2
        torch.testing.assert_close(disc(small), _score_with_strides(disc, small, (1, 1, 1)))
        assert not torch.allclose(disc(big), _score_with_strides(disc, big, (1, 1, 1)))


def test_prob_discriminator_is_an_mlp_on_probabilities() -> None:
    disc = ProbDiscriminator(10, hidden=64)
    assert count_params(disc) == (10 * 64 + 64) + (64 * 64 + 64) + (64 + 1)
    score = disc(torch.softmax(torch.randn(2, 10), dim=1))
    assert score.shape == (2,)
    with pytest.raises(ConfigError):
        ProbDiscriminator(10, n_layers=0)


# -------------------------------------------------------------------------------------------------- generators
def test_dfad_generator_images_for_32_and_28() -> None:
    torch.manual_seed(0)
    gen = DFADGenerator(nz=256, img_size=32, channels=3)
    img = gen(torch.randn(2, 256))
    assert img.shape == (2, 3, 32, 32)
    # the last layer is BN without affine parameters: in training, each channel is standardised over the batch
    torch.testing.assert_close(img.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(img.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    assert DFADGenerator(nz=64, img_size=28, channels=1)(torch.randn(2, 64)).shape == (2, 1, 28, 28)


def test_dfad_generator_layers_match_the_paper_code() -> None:
    gen = DFADGenerator(nz=256, img_size=32, channels=3)
    assert gen.l1.out_features == 128 * 8 * 8
    convs = [m for m in gen.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 128), (128, 64), (64, 3)]
    assert not gen.conv_blocks2[-1].affine
    linear, bn0 = 256 * 8192 + 8192, 2 * 128
    conv1, conv2, conv3 = 128 * 128 * 9 + 128 + 2 * 128, 128 * 64 * 9 + 64 + 2 * 64, 64 * 3 * 9 + 3
    assert count_params(gen) == linear + bn0 + conv1 + conv2 + conv3


def test_dfad_generator_needs_a_size_divisible_by_4() -> None:
    with pytest.raises(ConfigError) as err:
        DFADGenerator(img_size=30)
    assert err.value.value == 30


def test_residual_image_generator_keeps_shape_and_is_bounded() -> None:
    gen = ResidualImageGenerator(channels=1, hidden=8)
    x = 100 * torch.randn(2, 1, 28, 28)  # large inputs saturate the Tanh
    g = gen(x)
    assert g.shape == x.shape
    assert g.abs().max() <= 1.0
    assert ResidualImageGenerator(3)(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)
