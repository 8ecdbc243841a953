"""Backbones and the registry: every architecture builds and runs, parameter counts match the papers, bad names fail."""

from __future__ import annotations

import pytest
import torch
import torchvision

from kdray.errors import ConfigError
from kdray.models import build_network, check_arch, count_params, create_model, default_tap, list_models


@pytest.mark.parametrize("arch", list_models())
def test_every_registered_arch_runs_on_both_image_sizes_and_channel_counts(arch: str) -> None:
    torch.manual_seed(0)
    # wrn_28_10 (36M parameters, 5 GFLOPs an image) is checked for shapes only, on the meta device, to keep this fast.
    device = torch.device("meta" if arch == "wrn_28_10" else "cpu")
    for in_channels in (1, 3):
        with device:
            model = create_model(arch, num_classes=10, in_channels=in_channels).eval()
        with torch.no_grad():
            for size in (28, 32):
                logits = model(torch.randn(2, in_channels, size, size, device=device))
                assert logits.shape == (2, 10)
                assert device.type == "meta" or torch.isfinite(logits).all()


def test_list_models_names_every_family() -> None:
    names = list_models()
    assert len(names) == len(set(names))
    for arch in ("resnet8", "resnet110", "resnet8x4", "resnet32x4", "wrn_40_2", "wrn_28_10", "mobilenetv2"):
        assert arch in names


def test_resnet20_parameter_count() -> None:
    # Hand count, 10 classes, widths 16/32/64, bias-free convs, BN = 2 params per channel:
    #   stem 3*16*9 + 32 = 464
    #   layer1 3 blocks x (2 * 16*16*9 + 2*32) = 14,016
    #   layer2 (16*32*9 + 32*32*9 + 2*64) + 2 x (2 * 32*32*9 + 2*64) = 13,952 + 37,120 = 51,072
    #   layer3 (32*64*9 + 64*64*9 + 2*128) + 2 x (2 * 64*64*9 + 2*128) = 55,552 + 147,968 = 203,520
    #   fc 64*10 + 10 = 650                                  -> 269,722: He et al.'s 0.27M (option A shortcuts)
    #   1x1 projection shortcuts add 16*32 + 64 and 32*64 + 128 = 2,752 -> 272,474 (the default, as in RepDistiller)
    assert count_params(create_model("resnet20", 10, shortcut="pad")) == 269_722
    assert count_params(create_model("resnet20", 10)) == 272_474


def test_resnet8x4_parameter_count() -> None:
    # stem 3*32*9 + 64 = 928; layer1 32->64: 32*64*9 + 64*64*9 + 2*128 + (32*64 + 128) = 57,728
    # layer2 64->128: 64*128*9 + 128*128*9 + 2*256 + (64*128 + 256) = 230,144
    # layer3 128->256: 128*256*9 + 256*256*9 + 2*512 + (128*256 + 512) = 919,040; fc 256*C + C
    # total 1,210,410 for 10 classes
    assert count_params(create_model("resnet8x4", 10)) == 928 + 57_728 + 230_144 + 919_040 + 2_570
    assert count_params(create_model("resnet8x4", 100)) == 1_233_540  # CRD/RepDistiller's "1.23M" (CIFAR-100)


def test_wide_resnet_parameter_counts() -> None:
    # WRN-40-2, n = 6 blocks per group, widths 32/64/128 (pre-activation blocks: BN on the block's input):
    #   conv1 3*16*9 = 432
    #   block1 (2*16 + 16*32*9 + 2*32 + 32*32*9 + 16*32) + 5 x (2*32 + 32*32*9 + 2*32 + 32*32*9) = 14,432 + 92,800
    #   block2 (2*32 + 32*64*9 + 2*64 + 64*64*9 + 32*64) + 5 x (2 * (2*64 + 64*64*9)) = 57,536 + 369,920
    #   block3 (2*64 + 64*128*9 + 2*128 + 128*128*9 + 64*128) + 5 x (2 * (2*128 + 128*128*9)) = 229,760 + 1,477,120
    #   bn 256, fc 128*10 + 10 = 1,290                                   -> 2,243,546 (the paper's "2.2M")
    assert count_params(create_model("wrn_40_2", 10)) == 2_243_546
    with torch.device("meta"):  # 36M parameters: count them without initialising them
        assert round(count_params(create_model("wrn_28_10", 10)) / 1e6, 1) == 36.5  # the paper's Table 1


def test_mobilenetv2_has_torchvisions_parameter_count() -> None:
    # Only strides differ from the ImageNet network, so the count must equal torchvision's at every width.
    for width_mult in (1.0, 0.5):
        ours = count_params(create_model("mobilenetv2", 10, width_mult=width_mult))
        reference = torchvision.models.mobilenet_v2(num_classes=10, width_mult=width_mult)
        assert ours == count_params(reference)
    assert count_params(create_model("mobilenetv2", 10)) == 2_236_682


def test_four_stage_resnets_have_the_papers_parameter_counts() -> None:
    # CIFAR-100 (100 classes): the 11.2M ResNet-18 / 21.3M ResNet-34 of DFAD, CMI, CS-KD and PS-KD's tables. By hand:
    # stem 3*64*9 + BN 128; stage 1: 2 x (2 x 64*64*9 + 2 x 128); stage 2 (128): first block 64*128*9 + 128*128*9 +
    # 1x1 projection 64*128 + 3 BN x 256, second 2 x 128*128*9 + 2 x 256; stages 3 and 4 alike; fc 512*100 + 100.
    stage = [147_968, 230_144 + 295_424, 919_040 + 1_180_672, 3_673_088 + 4_720_640]
    assert count_params(create_model("resnet18", 100)) == 1_728 + 128 + sum(stage) + 51_300 == 11_220_132
    assert count_params(create_model("resnet34", 100)) == 21_328_292
    assert (
        count_params(create_model("preact_resnet18", 100)) == 11_218_340
    )  # no BN after the stem, 1x1 shortcuts w/o BN


def test_vgg8_parameter_count() -> None:
    # convs (with bias) + BN: 3->64, 64->128, 128->256, 256->512, 512->512; classifier 512*10 + 10
    convs = [(3, 64), (64, 128), (128, 256), (256, 512), (512, 512)]
    expected = sum(i * o * 9 + o + 2 * o for i, o in convs) + 5_130
    assert count_params(create_model("vgg8", 10)) == expected == 3_918_858


def test_width_kwarg_gives_tiny_resnets() -> None:
    # width 4: stem 3*4*9 + 8 = 116; layer1 2 * (4*4*9 + 8) = 304; layer2 4*8*9 + 8*8*9 + 32 + (32 + 16) = 944;
    # layer3 8*16*9 + 16*16*9 + 64 + (128 + 32) = 3,680; fc 16*10 + 10 = 170
    model = create_model("resnet8", 10, in_channels=3, width=4)
    assert count_params(model) == 116 + 304 + 944 + 3_680 + 170
    assert model.fc.in_features == 16
    wide = create_model("resnet8x4", 10, width=4)  # stem 2w, stages 4w / 8w / 16w
    assert (wide.conv1.out_channels, wide.layer1[0].conv1.out_channels, wide.fc.in_features) == (8, 16, 64)


def test_unknown_arch_kwargs_are_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        create_model("resnet8", 10, widht=4)
    assert err.value.key == "arch_kwargs" and "width" in err.value.accepted
    with pytest.raises(ConfigError, match="shortcut"):
        create_model("resnet8", 10, shortcut="identity")
    with pytest.raises(ConfigError):
        create_model("vgg8", 10, width=4)  # vgg takes no options


def test_check_arch_accepts_names_patterns_and_torchvision() -> None:
    for arch in [*list_models(), "wrn_10_1", "wrn_22_8", "tv:resnet18", "tv:mobilenet_v3_small"]:
        check_arch(arch)
    for bad in ("resnet999", "wrn_12_1", "wrn_40_0", "resnet", "tv:", "RESNET20"):
        with pytest.raises(ConfigError) as err:
            check_arch(bad)
        assert err.value.key == "arch" and err.value.value == bad


def test_check_arch_error_lists_accepted_names() -> None:
    with pytest.raises(ConfigError) as err:
        check_arch("resnet999")
    message = str(err.value)
    assert "'resnet999'" in message
    for accepted in (
        "resnet20",
        "resnet8x4",
        "wrn_40_2",
        "mobilenetv2",
        "vgg13",
        "wrn_{depth}_{width}",
        "tv:",
    ):
        assert accepted in message


def test_default_taps_of_registered_families() -> None:
    expected = {"resnet20": "layer3", "resnet32x4": "layer3", "wrn_16_2": "relu", "mobilenetv2": "features"}
    assert {arch: default_tap(arch) for arch in expected} == expected
    assert default_tap("vgg13") == "block4"
    with pytest.raises(ConfigError):
        default_tap("resnet999")


@pytest.mark.parametrize(
    ("arch", "size", "shape"),
    [
        ("wrn_16_1", 32, (64, 8, 8)),
        ("wrn_16_1", 28, (64, 7, 7)),
        ("vgg8", 32, (512, 2, 2)),
        ("mobilenetv2", 28, (1280, 4, 4)),
    ],
)
def test_default_tap_is_the_last_feature_map(arch: str, size: int, shape: tuple[int, ...]) -> None:
    kwargs = {"width_mult": 0.25} if arch == "mobilenetv2" else {}
    net = build_network(arch, 10, 1, taps={"feat": "default"}, **kwargs)
    out = net(torch.randn(2, 1, size, size))
    assert out["feat"].shape == (2, *shape)


# ----------------------------------------------------------------------------------------------- torchvision models
def test_torchvision_model_with_one_channel_builds_and_taps_layer4() -> None:
    net = build_network("tv:resnet18", 10, 1, taps={"feat": "layer4", "mid": "default"})
    assert net.model.conv1.in_channels == 1
    assert net.taps == {"feat": "layer4", "mid": "layer4"}
    out = net(torch.randn(2, 1, 32, 32))
    assert out["logits"].shape == (2, 10)
    assert out["feat"].shape == (2, 512, 1, 1)
    assert torch.equal(out["feat"], out["mid"])


def test_adapted_stem_sees_a_grey_image_as_the_rgb_model_sees_it_copied() -> None:
    torch.manual_seed(0)
    rgb = create_model("tv:mobilenet_v3_small", 10, in_channels=3).eval()
    torch.manual_seed(0)
    grey = create_model("tv:mobilenet_v3_small", 10, in_channels=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-6)


def test_torchvision_default_taps() -> None:
    assert default_tap("tv:resnet18") == "layer4"
    assert default_tap("tv:mobilenet_v3_small") == "features"
    assert default_tap("tv:squeezenet1_1") == "features"  # its pool sits inside the classifier head


def test_unknown_torchvision_name_is_a_config_error_with_suggestions() -> None:
    with pytest.raises(ConfigError) as err:
        create_model("tv:resnet19", 10)
    assert err.value.key == "arch" and err.value.value == "tv:resnet19"
    assert "tv:resnet18" in str(err.value)  # a close match is suggested
    with pytest.raises(ConfigError):
        check_arch("tv:fasterrcnn_resnet50_fpn")  # a detection model, not a classifier


def test_torchvision_weights_are_never_downloaded() -> None:
    with pytest.raises(ConfigError) as err:
        create_model("tv:resnet18", 10, weights="DEFAULT")
    assert err.value.key == "arch_kwargs.weights"


def test_a_network_no_device_could_hold_is_refused_before_any_allocation():
    """Shapes only (torch's meta device): 3e16 parameters are counted in milliseconds and refused with the key; a
    network at the bound's side of reason is built as before."""
    import time

    import pytest

    from kdray.errors import ConfigError
    from kdray.models import create_model
    from kdray.models.registry import MAX_PARAMETERS

    start = time.perf_counter()
    with pytest.raises(
        ConfigError, match=r"'arch_kwargs' = \{'width': 10000000\}: resnet8 .* 2\.98e\+16 parameters"
    ):
        create_model("resnet8", 10, 3, width=10**7)
    assert time.perf_counter() - start < 5
    net = create_model("resnet8", 10, 3, width=4)
    assert 0 < sum(p.numel() for p in net.parameters()) < MAX_PARAMETERS
    assert net.conv1.weight.device.type == "cpu"  # built for real, not left on the meta device
