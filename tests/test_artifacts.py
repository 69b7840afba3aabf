"""save/load: exact round trips without pickle, and clear refusals of damaged artifacts."""
from __future__ import annotations

import json

import pytest
import torch

import fxprune
from fxprune.models import build_model

from fxprune.artifacts import _seal

from .conftest import outputs


def reseal(recipe: dict) -> dict:
    """The recipe with a valid checksum again: an edit by someone who knows the format."""
    return _seal(recipe, None)
from .handler_models import Concat, SplitChunk

ARCHITECTURES = {  # residual, concat, depthwise + SE, split (channel shuffle), grouped
    "torchvision:resnet18": (1, 3, 64, 64),
    "torchvision:googlenet": (1, 3, 64, 64),
    "torchvision:mobilenet_v3_small": (1, 3, 64, 64),
    "torchvision:shufflenet_v2_x0_5": (1, 3, 64, 64),
    "torchvision:resnext50_32x4d": (1, 3, 64, 64),
}


def _same_outputs(a, b, x):
    for (pa, ta), (pb, tb) in zip(outputs(a, x), outputs(b, x)):
        assert pa == pb and torch.equal(ta, tb), pa


@pytest.mark.parametrize("spec", sorted(ARCHITECTURES))
def test_round_trip_is_exact(tmp_path, spec):
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.randn(ARCHITECTURES[spec])
    slim = fxprune.compress(model, "l1", x, 0.5, round_to=2)
    fxprune.save(slim, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.safetensors", "recipe.json", "shapes.txt"]
    again = fxprune.load(tmp_path / "a")
    _same_outputs(slim, again, x)
    assert again.training == slim.training
    lines = (tmp_path / "a" / "shapes.txt").read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == list(slim.state_dict())


@pytest.mark.parametrize("build", [Concat, lambda: SplitChunk("getitem")])
def test_round_trip_with_user_base_model_and_structures(tmp_path, build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(model, x)
    from fxprune.passes.plan import PruningPlan

    keep = {g.index: list(range(0, g.n_units, 2)) for g in a.channels.prunable_groups}
    drops = [(c.cat, c.index) for c in a.structures.concat_inputs[:1]]
    slim, check = fxprune.prune_with_plan(a, PruningPlan(keep=keep, drop_concat_inputs=drops))
    assert check.passed
    fxprune.save(slim, tmp_path / "m")
    with pytest.raises(fxprune.ArtifactError, match="pass base_model="):
        fxprune.load(tmp_path / "m")
    _same_outputs(slim, fxprune.load(tmp_path / "m", base_model=build()), x)


def test_low_precision_and_train_mode_round_trip(tmp_path):
    model = build_model("torchvision:resnet18").to(torch.bfloat16).train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    slim = fxprune.compress(model, "l2", x, 0.6)
    fxprune.save(slim, tmp_path / "b")
    again = fxprune.load(tmp_path / "b")
    assert again.training and {p.dtype for p in again.parameters()} == {torch.bfloat16}
    _same_outputs(slim, again, x)


@pytest.fixture
def saved(tmp_path):
    model = build_model("torchvision:resnet18").eval()
    slim = fxprune.compress(model, "l1", torch.randn(1, 3, 32, 32), 0.5)
    fxprune.save(slim, tmp_path / "r")
    return tmp_path / "r"


def test_missing_recipe(saved):
    (saved / "recipe.json").unlink()
    with pytest.raises(fxprune.ArtifactError, match="recipe.json is missing.*interrupted"):
        fxprune.load(saved)


def test_truncated_weights(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(fxprune.ArtifactError, match="truncated or corrupted"):
        fxprune.load(saved)


def test_corrupted_recipe(saved):
    text = (saved / "recipe.json").read_text()
    (saved / "recipe.json").write_text(text[: len(text) // 3])
    with pytest.raises(fxprune.ArtifactError, match="recipe.json is truncated or corrupted"):
        fxprune.load(saved)


def test_wrong_base_model(saved):
    with pytest.raises(fxprune.ArtifactError, match="base model does not match the recipe.*ResNet"):
        fxprune.load(saved, base_model=build_model("torchvision:resnet34"))


def test_plan_that_disagrees_with_weights(saved):
    recipe = json.loads((saved / "recipe.json").read_text())
    group, kept = next(iter(recipe["plan"]["keep"].items()))
    recipe["plan"]["keep"][group] = kept[:-1]
    (saved / "recipe.json").write_text(json.dumps(reseal(recipe)))
    with pytest.raises(fxprune.ArtifactError, match="has shape .* in the file but"):
        fxprune.load(saved)


def test_saving_a_plain_module_is_refused(tmp_path):
    with pytest.raises(fxprune.ArtifactError, match="no fxprune recipe"):
        fxprune.save(torch.nn.Linear(2, 2), tmp_path / "x")


def test_load_never_unpickles(saved, monkeypatch):
    import pickle

    def refuse(*_a, **_k):
        raise AssertionError("unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = fxprune.load(saved)
    assert isinstance(loaded, torch.fx.GraphModule) and loaded.fxprune_recipe["plan"]["keep"]
