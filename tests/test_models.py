"""Model zoo and registry: every model builds and forwards its registered input size; names and options
are checked; the models are traceable by torch-pruning."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch_pruning as tp
from torch import nn

from autocompress.errors import UserError
from autocompress.models import create_model, list_models, model_info, register_model

ZOO = ["fmnist_cnn", "lenet5", "resnet110", "resnet18", "resnet20", "resnet32", "resnet50", "resnet56",
       "vgg11", "vgg13", "vgg16", "vgg19"]


def test_list_models_is_the_zoo():
    assert list_models() == ZOO
    assert "torchvision:resnet50" in list_models(include_torchvision=True)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_forwards_its_input_size(name):
    torch.manual_seed(0)
    info = model_info(name)
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, *info.input_size))
    assert out.shape == (1, 7)
    assert torch.isfinite(out).all()


def _hand_resnet_cifar_params(n: int) -> int:
    """He et al. 2016 CIFAR ResNet (6n+2 layers) with option-B (1x1 conv + BN) shortcuts, by hand."""
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731
    total = conv(3, 16, 3) + 2 * 16  # stem conv + BN
    cin = 16
    for width in (16, 32, 64):
        for block in range(n):
            total += conv(cin, width, 3) + 2 * width + conv(width, width, 3) + 2 * width
            if cin != width:
                total += conv(cin, width, 1) + 2 * width
            cin = width
    return total + 64 * 10 + 10


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet32", 5), ("resnet56", 9), ("resnet110", 18)])
def test_cifar_resnet_parameters_match_hand_count(name, n):
    params = sum(p.numel() for p in create_model(name).parameters())
    assert params == _hand_resnet_cifar_params(n)
    # option A (zero-padding shortcuts) would have 2*16*32+2*32 + 32*64+2*64 = 2752 fewer parameters
    if name == "resnet20":
        assert params == 272_474 and params - 2_752 == 269_722


def test_vgg16_parameters_match_hand_count_and_width_scales():
    layout = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]

    def hand(width):
        chans = [round(c * width) for c in layout]
        total, cin = 0, 3
        for c in chans:
            total += cin * c * 9 + 2 * c
            cin = c
        return total + cin * 10 + 10

    assert sum(p.numel() for p in create_model("vgg16").parameters()) == hand(1.0) == 14_724_042
    assert sum(p.numel() for p in create_model("vgg16", width=0.5).parameters()) == hand(0.5)


def test_cifar_resnet18_and_50_use_the_cifar_stem():
    for name in ("resnet18", "resnet50"):
        model = create_model(name)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, nn.Identity)
    assert sum(p.numel() for p in create_model("resnet18").parameters()) == 11_173_962


def test_fmnist_cnn_width_multiplier():
    convs = [m.out_channels for m in create_model("fmnist_cnn", width=0.5).modules() if isinstance(m, nn.Conv2d)]
    assert convs == [16, 16, 32, 32, 64]


def test_torchvision_model_by_name_without_download():
    model = create_model("torchvision:resnet18", num_classes=5).eval()
    assert model_info("torchvision:resnet18").input_size == (3, 224, 224)
    assert model_info("torchvision:inception_v3").input_size == (3, 299, 299)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_unknown_model_names_close_matches():
    with pytest.raises(UserError, match=r"unknown model 'resnet2'.*resnet20.*autocompress inspect --list-models"):
        create_model("resnet2")
    with pytest.raises(UserError, match="unknown model 'torchvision:not_a_model'") as info:
        model_info("torchvision:not_a_model")
    assert "did you mean" not in str(info.value)  # the shared prefix alone is no match
    with pytest.raises(UserError, match=r"did you mean torchvision:resnet18\b"):
        create_model("torchvision:resnet81")


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="takes no option 'depth'.*width"):
        create_model("vgg16", depth=3)
    with pytest.raises(UserError, match="width must be positive"):
        create_model("fmnist_cnn", width=0)
    with pytest.raises(UserError, match="num_classes"):
        create_model("lenet5", num_classes=0)


def _define_tiny(hidden_default: int):
    """Define the builder ``tiny`` afresh (as a re-run notebook cell does): a new object, same qualname."""
    def tiny(num_classes: int = 10, hidden: int = hidden_default) -> nn.Module:
        """A tiny MLP used only by this test."""
        return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.Linear(hidden, num_classes))

    return tiny


def test_register_model_registers_new_names_and_rejects_duplicates():
    from autocompress.models import registry

    register_model("test_tiny_linear", input_size=(1, 2, 2))(_define_tiny(3))
    try:
        assert "test_tiny_linear" in list_models()
        assert model_info("test_tiny_linear").description == "A tiny MLP used only by this test."
        model = create_model("test_tiny_linear", num_classes=2, hidden=5)
        assert model[1].out_features == 5 and model(torch.zeros(3, 1, 2, 2)).shape == (3, 2)
        # re-registering the same builder (a re-run cell) is no error and takes the new definition
        register_model("test_tiny_linear", input_size=(1, 2, 2))(_define_tiny(7))
        assert inspect.signature(model_info("test_tiny_linear").builder).parameters["hidden"].default == 7
    finally:
        registry._REGISTRY.pop("test_tiny_linear")
    with pytest.raises(ValueError, match="already registered to autocompress.models.resnet_cifar"):
        register_model("resnet20", input_size=(3, 32, 32))(_define_tiny(3))
    assert model_info("resnet20").builder.__module__ == "autocompress.models.resnet_cifar"  # untouched
    with pytest.raises(ValueError, match="reserved"):
        register_model("torchvision:x", input_size=(3, 32, 32))


@pytest.mark.parametrize("name,size", [("fmnist_cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))])
def test_models_are_traceable_and_prunable_by_torch_pruning(name, size):
    torch.manual_seed(0)
    model = create_model(name).eval()
    example = torch.randn(1, *size)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels > 3)
    expected = first_conv.out_channels - 2
    group = graph.get_pruning_group(first_conv, tp.prune_conv_out_channels, idxs=[0, 1])
    group.prune()
    assert first_conv.out_channels == expected
    with torch.no_grad():
        assert model(example).shape == (1, 10)
