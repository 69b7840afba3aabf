"""Artifacts are data: a tampered recipe never runs code, never allocates what it asks for, and
every damaged field is an ArtifactError (never a raw exception). Each hostile probe of issue 13 is
reproduced here on a recipe edited *and resealed* (someone who knows the format), so the schema
and the allow-list are what stops it, not only the checksum."""
from __future__ import annotations

import copy
import json
import random
import resource
import sys
import warnings

import pytest
import torch
from torch import nn

import fxprune
from fxprune.artifacts import _seal
from fxprune.models import build_model

from .conftest import outputs


def _write(folder, recipe, key=None):
    (folder / "recipe.json").write_text(json.dumps(_seal(recipe, key)))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("art") / "r"
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18").eval()
    slim = fxprune.compress(model, "l1", torch.randn(1, 3, 32, 32), 0.5)
    fxprune.save(slim, folder)
    return folder, json.loads((folder / "recipe.json").read_text()), slim


@pytest.fixture
def edited(artifact, tmp_path):
    """A fresh copy of the artifact folder and its recipe, to edit."""
    folder, recipe, _ = artifact
    dst = tmp_path / "r"
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst, copy.deepcopy(recipe)


def test_subprocess_spec_never_runs(edited, tmp_path):
    folder, recipe = edited
    marker = tmp_path / "ran"
    recipe["base"].update(spec="subprocess:run", kwargs={"args": ["touch", str(marker)]})
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="subprocess:run.*not an allow-listed.*trust_code=True"):
        fxprune.load(folder)
    assert not marker.exists()


def test_python_file_spec_is_not_executed(edited, tmp_path):
    folder, recipe = edited
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\nMODEL = None\n")
    recipe["base"].update(spec=f"{evil}:MODEL", kwargs={})
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="not an allow-listed"):
        fxprune.load(folder)
    assert not marker.exists()


def test_recorded_module_type_is_never_imported(edited):
    folder, recipe = edited
    recipe["trace"]["leaf_modules"] = [{"type": "antigravity.Fly"}]
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="not imported here"):
        fxprune.load(folder)
    assert "antigravity" not in sys.modules


def test_unsealed_edit_is_refused(edited):
    folder, recipe = edited
    recipe["plan"]["keep"]["0"] = recipe["plan"]["keep"]["0"][:-1]
    (folder / "recipe.json").write_text(json.dumps(recipe))  # checksum now stale
    with pytest.raises(fxprune.ArtifactError, match="does not match its checksum"):
        fxprune.load(folder)


def test_signed_artifacts_need_the_key(tmp_path, artifact):
    _, _, slim = artifact
    fxprune.save(slim, tmp_path / "s", key="secret")
    with pytest.raises(fxprune.ArtifactError, match="is signed: pass the key"):
        fxprune.load(tmp_path / "s")
    with pytest.raises(fxprune.ArtifactError, match="not signed with this key"):
        fxprune.load(tmp_path / "s", key="other")
    recipe = json.loads((tmp_path / "s" / "recipe.json").read_text())
    _write(tmp_path / "s", recipe)  # resealed with a plain checksum, without the key
    with pytest.raises(fxprune.ArtifactError, match="not signed with this key"):
        fxprune.load(tmp_path / "s", key="secret")
    x = torch.randn(1, 3, 32, 32)
    fxprune.save(slim, tmp_path / "s", key="secret")
    again = fxprune.load(tmp_path / "s", key=b"secret")
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(outputs(slim, x), outputs(again, x)))


def test_trusted_and_registered_builders(tmp_path, artifact):
    builders = tmp_path / "builders.py"
    builders.write_text("import torchvision\ndef net():\n    return torchvision.models.resnet18(weights=None)\n")
    _, _, slim = artifact
    spec = f"{builders}:net"
    fxprune.save(slim, tmp_path / "u", base_spec=spec)
    with pytest.raises(fxprune.ArtifactError, match="not an allow-listed"):
        fxprune.load(tmp_path / "u")
    x = torch.randn(1, 3, 32, 32)
    for again in (fxprune.load(tmp_path / "u", trust_code=True),):
        assert torch.equal(outputs(slim, x)[0][1], outputs(again, x)[0][1])
    fxprune.register_builder("my-resnet18", lambda: build_model("torchvision:resnet18"))
    fxprune.save(slim, tmp_path / "v", base_spec="my-resnet18")
    assert torch.equal(outputs(slim, x)[0][1], outputs(fxprune.load(tmp_path / "v"), x)[0][1])


def test_python_built_torchvision_model_loads_without_a_spec(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    slim = fxprune.compress(model, "l1", x, 0.5)
    fxprune.save(slim, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "recipe.json").read_text())["base"]["spec"] == "torchvision:resnet18"
    assert torch.equal(outputs(slim, x)[0][1], outputs(fxprune.load(tmp_path / "p"), x)[0][1])


def test_huge_input_shape_is_refused_before_allocating(edited):
    folder, recipe = edited
    recipe["inputs"]["args"][0]["tensor"]["shape"] = [4096, 3, 2048, 2048]  # 200 GB of float32
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="example inputs take .* MiB, above the limit"):
        fxprune.load(folder)


def test_huge_base_model_is_refused_before_allocating(edited):
    folder, recipe = edited
    recipe["base"]["kwargs"] = {"num_classes": 10**9}
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="GiB, above the limit"):
        fxprune.load(folder)


def test_weights_file_outside_the_folder(edited):
    folder, recipe = edited
    recipe["weights"]["file"] = "../../etc/passwd"
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="weights.file"):
        fxprune.load(folder)


@pytest.mark.parametrize("index", [-1, 10**6, "3"])
def test_keep_index_out_of_range(edited, index):
    folder, recipe = edited
    recipe["plan"]["keep"]["0"] = [index]
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match=r"plan.keep.0"):
        fxprune.load(folder)


def test_bogus_fold_scales_and_structures(edited):
    folder, recipe = edited
    recipe["plan"]["fold_scales"] = ["no_such_gate"]
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="fold_scales names 'no_such_gate'"):
        fxprune.load(folder)
    recipe["plan"]["fold_scales"] = []
    recipe["plan"]["remove_branches"] = [["add_99", 0]]
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="not a removable structure"):
        fxprune.load(folder)


def test_changed_versions_are_reported(edited):
    folder, recipe = edited
    recipe["versions"]["torch"] = "1.0.0"
    _write(folder, recipe)
    with pytest.warns(fxprune.ArtifactVersionWarning, match="torch 1.0.0 ->"):
        fxprune.load(folder)


def test_output_fingerprint_catches_a_different_function(edited):
    folder, recipe = edited
    recipe["check"]["outputs"][0]["norm"] *= 1.5
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="does not rebuild the model that was saved"):
        fxprune.load(folder)


def test_weights_swapped_for_other_values_of_the_same_shapes(edited, artifact):
    """The weights' checksum is resealed too: only the output fingerprint can notice."""
    import hashlib

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    folder, recipe = edited
    tensors = st_load((folder / "model.safetensors").read_bytes())
    tensors = {k: (v * 1.5 if v.is_floating_point() and k.endswith("weight") else v) for k, v in tensors.items()}
    data = st_save(tensors)
    (folder / "model.safetensors").write_bytes(data)
    recipe["weights"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    _write(folder, recipe)
    with pytest.raises(fxprune.ArtifactError, match="does not rebuild"):
        fxprune.load(folder)


# --- fuzz: random mutations of every field, each resealed ------------------------------------------

_EVIL = ["subprocess:run", "os:system", "/tmp/x.py:M", "../../x", "torch", "load", "exec", "", None, -1, 2**70,
         1e308, float("inf"), [], {}, [[[]]], {"type": "os.system"}, "a" * 5000, True, 0, 3, "float32", "0",
         {"tensor": {"shape": [10**9], "dtype": "float32"}}, {"value": {"x": 1}}, ["add", 0], [-5]]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            yield from _paths(v, (*prefix, i))


def _mutate(recipe: dict, rng: random.Random) -> dict:
    recipe = copy.deepcopy(recipe)
    paths = [p for p in _paths(recipe) if p and p[0] not in ("checksum", "report")]
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        parent = recipe
        try:
            for k in path[:-1]:
                parent = parent[k]
            kind = rng.random()
            if kind < 0.15 and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif kind < 0.25 and isinstance(parent, dict):
                parent[f"extra{rng.randint(0, 9)}"] = rng.choice(_EVIL)
            else:
                parent[path[-1]] = rng.choice(_EVIL)
        except (KeyError, IndexError, TypeError):
            continue
    return recipe


def test_fuzzed_recipes_load_or_raise_artifact_error(artifact, tmp_path):
    folder, recipe, slim = artifact
    dst = tmp_path / "f"
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    rng = random.Random(13)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(150):
        mutated = _mutate(recipe, rng)
        try:
            (dst / "recipe.json").write_text(json.dumps(_seal(mutated, None)))
        except (ValueError, TypeError):  # not representable as JSON (inf): written raw instead
            (dst / "recipe.json").write_text(json.dumps(mutated, default=str))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fxprune.load(dst, max_bytes=2**30)
                outcomes["loaded"] += 1
            except fxprune.ArtifactError:
                outcomes["refused"] += 1
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert grown < 2**30, f"loading fuzzed recipes grew the peak memory by {grown / 2**30:.1f} GiB"
    assert outcomes["refused"] > 100, outcomes


def test_a_plain_module_base_is_not_modified(artifact):
    folder, _, _ = artifact
    base = build_model("torchvision:resnet18").eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    fxprune.load(folder, base_model=base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(fxprune.ConfigError, match="base_model must be an nn.Module"):
        fxprune.load(folder, base_model="resnet18")
    assert isinstance(base, nn.Module)
