"""The engine's public API: prune() end to end on real Fashion-MNIST, and RATES.yaml expansion."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress import compaction, rounds
from autocompress.admm import ADMMConfig
from autocompress.analysis import analysis_mode
from autocompress.compaction import ColumnConv2d
from autocompress.data import get_dataset
from autocompress.errors import SettingError, UserError
from autocompress.masks import apply_masks
from autocompress.metrics import count_params
from autocompress.models import create_model
from autocompress.pruning import expand_rates, prune
from autocompress.space import PruningSpace
from autocompress.training import TrainConfig, seeded


@pytest.fixture(scope="module")
def splits():
    torch.set_num_threads(1)
    return get_dataset("fashion-mnist", val_size=300, max_train=600, max_test=200)


def test_prune_end_to_end_compact_equals_masked(splits, monkeypatch):
    with seeded(0):
        model = create_model("fmnist_cnn", width=0.25)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    example = torch.zeros(1, 1, 28, 28)
    masked_models = []
    real_compact = compaction.compact

    def spy(model, param_masks, example_inputs, **kwargs):  # the masked model each compaction starts from
        masked = copy.deepcopy(model)
        apply_masks(masked, param_masks)
        masked_models.append((masked, param_masks))
        return real_compact(model, param_masks, example_inputs, **kwargs)

    monkeypatch.setattr(rounds, "compact", spy)
    result = prune(model, {"default": 0.5, "filter": {"features.6.0": 0.75}}, example_inputs=example,
                   train_loader=splits.loader("train", 64), val_loader=splits.loader("val", 300), device="cpu",
                   admm=ADMMConfig(epochs=1, lr=0.01, rho_init=0.5, update_interval=5),
                   retrain=TrainConfig(epochs=1, lr=0.01), progress=False)
    masked_model, param_masks = masked_models[-1]  # the final compaction's input (after retraining)
    for n, p in model.named_parameters():           # the input model is left alone
        assert torch.equal(p, original[n])
    images = next(iter(splits.loader("test", 200)))[0]
    with analysis_mode(masked_model), analysis_mode(result.compact_model):
        masked, compact = masked_model(images), result.compact_model(images)
    assert (masked - compact).abs().max() <= 1e-5 * max(1.0, float(masked.abs().max()))
    report = result.report
    assert report["params_after"] == count_params(result.compact_model) < report["params_before"]
    assert report["compression_rate"] == pytest.approx(report["params_before"] / report["params_after"])
    # widths of the compact model are the kept units of the report
    kept = report["kept"]
    compact_modules = dict(result.compact_model.named_modules())
    for group, (k, total) in kept["filters"].items():
        module = compact_modules[group]
        assert module.out_channels == k, group
    assert kept["filters"]["features.6.0"][0] <= 8   # 75 % of 32 removed (purification may remove more)
    for layer, (k, total) in kept["columns"].items():
        module = compact_modules[layer]
        if isinstance(module, ColumnConv2d):
            assert module.num_columns <= k
    # the retrained model's non-zero structure matches the param masks
    params = dict(masked_model.named_parameters())
    for name, mask in param_masks.items():
        assert bool((params[name].detach()[~mask] == 0).all())
    assert set(report["score"]) == {"before", "purified", "after"}
    assert 0.0 <= report["score"]["after"] <= 1.0


def test_expand_rates_default_overrides_and_errors():
    model = create_model("lenet5")
    space = PruningSpace.build(model, torch.zeros(1, 1, 28, 28), dims=("filter", "column"))
    rates = expand_rates(space, {"default": 0.5, "column": {"classifier.0": 0.9}}, ("filter", "column"))
    assert rates["column"]["classifier.0"] == 0.9
    assert rates["column"]["features.0"] == 0.5
    assert set(rates["filter"]) == {g.name for g in space.filter_groups}
    assert rates["irregular"] == {}
    with pytest.raises(UserError, match="valid column names: features.0"):
        expand_rates(space, {"column": {"conv9": 0.5}}, ("filter", "column"))
    with pytest.raises(UserError, match=r"outside \[0, 1\)"):
        expand_rates(space, {"default": 1.0}, ("filter", "column"))
    with pytest.raises(UserError, match="but dims is column"):
        expand_rates(space, {"filter": {"features.0": 0.5}}, ("column",))
    with pytest.raises(UserError, match="unknown key"):
        expand_rates(space, {"filters": {}}, ("filter",))


def test_irregular_report_counts_the_parameters_a_sparse_format_stores(splits):
    """Weights of 2+ dimensions by their non-zero entries, vectors in full: this never-trained model's BatchNorm
    biases are all zero and still count (fresh user 60: counted as pruned, they met a target retraining missed)."""
    with seeded(0):
        model = create_model("fmnist_cnn", width=0.25)
    result = prune(model, {"default": 0.5}, example_inputs=torch.zeros(1, 1, 28, 28), device="cpu",
                   dims=("irregular",), admm=ADMMConfig(epochs=0), retrain=TrainConfig(epochs=0), purify=False,
                   progress=False)
    params = list(result.compact_model.parameters())
    stored = sum(int((p != 0).sum()) for p in params if p.dim() >= 2) + sum(p.numel() for p in params if p.dim() < 2)
    assert sum(int((p == 0).sum()) for p in params if p.dim() < 2) > 0  # the zero biases
    assert result.report["params_after"] == stored < count_params(result.compact_model)
    assert result.report["compression_rate"] == pytest.approx(result.report["params_before"] / stored)


def test_dims_in_the_config_s_text_form_prune_the_same_units():
    """``dims="filter,column"`` (the config's spelling) is the tuple ``("filter", "column")``, not its letters."""
    results = []
    for dims in ("filter, column", ("filter", "column")):
        with seeded(0):
            model = create_model("fmnist_cnn", width=0.25)
        results.append(prune(model, {"default": 0.5}, example_inputs=torch.zeros(1, 1, 28, 28), device="cpu",
                             dims=dims, admm=ADMMConfig(epochs=0), retrain=TrainConfig(epochs=0), purify=False,
                             progress=False).report)
    assert results[0]["dims"] == ["filter", "column"] and results[0]["params_after"] == results[1]["params_after"]
    with pytest.raises(SettingError, match="^dims='filters' names an unknown pruning dimension; choose from") as error:
        prune(create_model("fmnist_cnn", width=0.25), {}, example_inputs=torch.zeros(1, 1, 28, 28), dims="filters")
    assert error.value.setting == "dims"


def test_prune_takes_its_settings_as_a_config_file_s_sections_and_names_a_bad_one():
    """Fresh user 59: ``admm={"epochs": 0}`` (as ``compress``'s config takes it) raised an AttributeError, the result
    had ``compact_model`` where ``compress``'s has ``model``, and printing it dumped every mask."""

    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    result = prune(model, {"filter": {"0": 0.5}}, example_inputs=x, device="cpu", dims=("filter",),
                   admm={"epochs": 0}, retrain={"epochs": 0}, purify=False, progress=False)
    assert result.model is result.compact_model and result.model[0].out_channels == 4
    assert "masks" not in repr(result) and "report" not in repr(result)
    with pytest.raises(SettingError, match=r"admm\.epoch"):
        prune(model, {"filter": {"0": 0.5}}, example_inputs=x, device="cpu", admm={"epoch": 0}, progress=False)
    for section, setting in (({"epochs": 0, "optimizer": "adam"}, "retrain.optimizer"),  # fresh user 62: no
                             ({"epochs": 0, "schedule": "linear"}, "retrain.schedule")):  # retraining, still a typo
        with pytest.raises(SettingError, match=rf"^{setting}=.* is unknown; use one of ") as error:
            prune(model, {"filter": {"0": 0.5}}, example_inputs=x, device="cpu", config={"retrain": section},
                  progress=False)
        assert error.value.setting == setting


def test_prune_reads_a_compress_config_s_round_settings_and_refuses_the_others():
    """Fresh user 60 passed ``config={"admm": ..., "retrain": ...}`` as to ``compress`` and got a TypeError: the
    config's round settings give the same model as the keyword arguments; a compress-only setting, or a setting
    given both ways, is refused naming it, before any work."""
    from autocompress import CompressConfig
    from autocompress.errors import SettingError

    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    rates = {"filter": {"0": 0.5}, "column": {"2": 0.5}}
    by_keywords = prune(model, rates, example_inputs=x, device="cpu", dims="filter,column", admm={"epochs": 0},
                        retrain={"epochs": 0}, purify=False, progress=False)
    settings = {"dims": "filter,column", "admm": {"epochs": 0}, "retrain": {"epochs": 0},
                "purification": {"enabled": False}}
    for config in (settings, CompressConfig.from_dict(settings, validate=False)):
        by_config = prune(model, rates, example_inputs=x, device="cpu", config=config, progress=False)
        assert by_config.report["kept"] == by_keywords.report["kept"]
        assert torch.equal(by_config.model(x), by_keywords.model(x))
    with pytest.raises(SettingError, match=r"prune does not use budget") as info:
        prune(model, rates, example_inputs=x, config={"budget": 3, "admm": {"epochs": 0}}, progress=False)
    assert info.value.setting == "budget"
    with pytest.raises(SettingError, match=r"admm is given both as prune's keyword argument and in config"):
        prune(model, rates, example_inputs=x, admm={"epochs": 0}, config={"admm": {"epochs": 0}}, progress=False)
    with pytest.raises(SettingError, match=r"purification is given both"):
        prune(model, rates, example_inputs=x, purify=False, ignored_layers=[], config=settings, progress=False)
    with pytest.raises(SettingError, match=r"^layer_norm is given as prune's keyword argument beside config, which "
                                           r"holds every round setting when given; move layer_norm into config"):
        prune(model, rates, example_inputs=x, layer_norm="padded", config=settings, progress=False)  # (user 92)
    with pytest.raises(SettingError, match=r"retrain\.epoch"):
        prune(model, rates, example_inputs=x, config={"retrain": {"epoch": 0}}, progress=False)


class TwoOutputs(nn.Module):
    """``[B, 5, 7]`` -> ``(logits [B, 3], the input's mean [B])``: a model returning a second output."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(5, 16, 3, padding=1), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(2)), x.mean((1, 2))


def test_prune_scoring_a_tuple_output_is_refused_naming_forward_fn():
    """Fresh user 92: ``prune`` with a val_loader on a model returning ``(logits, hidden)`` crashed with a raw
    ``AttributeError: 'tuple' object has no attribute 'argmax'`` where ``compress`` refused it before any work."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 5, 7, generator=g), torch.randint(0, 3, (32,), generator=g)),
                      batch_size=16)
    with pytest.raises(UserError, match=r"^the forward returns a tuple on a batch of val_loader, .* pass forward_fn"):
        prune(TwoOutputs(), {"default": 0.5}, example_inputs=torch.randn(1, 5, 7), train_loader=data, val_loader=data,
              config={"admm": {"epochs": 0}, "retrain": {"epochs": 0}}, progress=False)
    done = prune(TwoOutputs(), {"default": 0.5}, example_inputs=torch.randn(1, 5, 7), val_loader=data,  # no training
                 forward_fn=lambda model, batch: model(batch[0])[0],
                 config={"admm": {"epochs": 0}, "retrain": {"epochs": 0}}, progress=False)
    assert done.model.conv.out_channels < 16  # scored through forward_fn, pruned
