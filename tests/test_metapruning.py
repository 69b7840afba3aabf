"""MetaPruning: the PruningNet's cropped networks have exactly the sampled widths, coupled groups
share one width, genome MACs equal the rewritten model's, the search stays under its limits (a
latency limit on the package's latency model, `fxprune.latency_model`), and the result is the
verified slim model of the best genome."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fxprune.passes.plan import PruningPlan
from fxprune.passes.pruningnet import PruningNet, write_back
from fxprune.passes.rewrite import apply_plan
from fxprune.passes.tensors import get_tensor
from fxprune.passes.width_encoding import DEFAULT_RATIOS, build_encoding, ratio_grid
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.latency_model import TimedCall, profile_latency
from fxprune.methods.metapruning.method import (
    LatencyUnreachableError,
    MetaPruningOptions,
    genome_kept,
    pretrain,
    split_data,
)
from fxprune.nets import resnet20
from fxprune.train import TrainingError, evaluate

from .conftest import assert_close_outputs, measured_macs, n_params, outputs
from .handler_models import HANDLER_MODELS, Residual, ResidualClassifier


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded: the CPU is shared, and tiny ops on two busy cores mostly wait for each other
    (latency timings above all: multi-threaded timings on an oversubscribed CPU are meaningless)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = dict(epochs=1, population=6, generations=2, parents=3, mutations=3, crossovers=3, calib_batches=2)


def _setup(model, shape, seed=0):
    torch.manual_seed(seed)
    model = model.eval()
    x = torch.randn(shape)
    a = fxprune.analyze(model, x)
    enc = build_encoding(a.channels)
    return model, x, a, enc, PruningNet(a.channels, enc, hidden=8, seed=seed)


def _randomize_generators(net, seed=0):
    """Non-zero second layers, so generated weights really depend on the widths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gen in net.generators.values():
            gen.fc2.weight.copy_(torch.randn(gen.fc2.weight.shape, generator=g) * 0.01)


def test_default_ratios_are_the_authors_grid():
    assert DEFAULT_RATIOS[0] == 0.10 and DEFAULT_RATIOS[-1] == 1.00 and len(DEFAULT_RATIOS) == 31
    assert np.allclose(np.diff(DEFAULT_RATIOS), 0.03)
    assert ratio_grid(0.25, 0.25) == (0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize("name", sorted(HANDLER_MODELS))
def test_every_handler_model_gets_a_pruningnet_whose_networks_have_the_sampled_widths(name):
    build, shape = HANDLER_MODELS[name]
    model, x, a, enc, net = _setup(build(), shape)
    _randomize_generators(net)
    rng = np.random.default_rng(1)
    for genome in (enc.full(), enc.smallest(), enc.random(rng)):
        slim = net.materialize(genome)
        reference = apply_plan(a.channels, net.plan(genome))  # the core rewrite of the same keep-set
        for (pname, p), (rname, r) in zip(slim.named_parameters(), reference.named_parameters()):
            assert pname == rname and p.shape == r.shape, pname
        # MACs of the genome == what FlopCounterMode counts on the built model
        assert enc.macs(a.cost, genome) == pytest.approx(measured_macs(slim, x), rel=1e-9)
        assert enc.params(a.cost, genome) == pytest.approx(n_params(slim), rel=1e-9)
        # the PruningNet's own forward (functional, differentiable) computes the same network
        net.eval()
        with torch.no_grad():
            ours = net(x, genome=genome)
        for (_, want), got in zip(outputs(slim, x), torch.utils._pytree.tree_leaves(ours)):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cropping_takes_the_first_channels_of_the_generated_weight():
    model, x, a, enc, net = _setup(resnet20(), (1, 1, 16, 16))
    _randomize_generators(net)
    genome = enc.random(np.random.default_rng(3))
    kept = dict(zip(enc.groups, enc.counts(genome)))
    slim = net.materialize(genome)
    gen = net.generators["layer2__1__conv1__weight"]
    full = gen(torch.as_tensor(enc.ratios(genome), dtype=torch.float32)[gen.genes]).detach()
    group_out = next(g for g in a.channels.groups if g.leading.target == "layer2.1.conv1.weight").index
    group_in = next(g for g in a.channels.groups
                    if any(m.target == "layer2.1.conv1.weight" and m.role == "in" for m in g.members)).index
    k_out, k_in = kept[group_out], kept[group_in]
    conv = slim.get_submodule("layer2.1.conv1")
    assert conv.weight.shape == (k_out, k_in, 3, 3)
    assert torch.equal(conv.weight, full[:k_out, :k_in])
    assert conv.out_channels == k_out and conv.in_channels == k_in
    # the generator's input is the kept fraction of exactly its input and output groups
    assert sorted(enc.groups[i] for i in gen.genes) == sorted({group_out, group_in})


def test_coupled_groups_share_one_width_variable():
    model, x, a, enc, net = _setup(resnet20(), (1, 1, 16, 16))
    # one gene per stage stream (residual adds couple every block's output and the shortcut)
    # plus one per block's inner conv: 3 + 9
    assert len(enc) == 12
    rng = np.random.default_rng(0)
    for _ in range(3):
        slim = net.materialize(enc.random(rng))
        for stage in ("layer1", "layer2", "layer3"):
            blocks = [slim.get_submodule(f"{stage}.{i}") for i in range(3)]
            widths = {b.bn2.num_features for b in blocks} | {b.conv2.out_channels for b in blocks}
            widths |= {b.conv1.in_channels for b in blocks[1:]}
            widths |= {m.out_channels for b in blocks for m in b.modules() if isinstance(m, nn.Conv2d)
                       and m.kernel_size == (1, 1)}  # the projection shortcut
            assert len(widths) == 1, widths
        first = slim.get_submodule("layer1.0.conv1")
        assert first.in_channels == slim.conv1.out_channels == slim.get_submodule("layer1.2.bn2").num_features


def test_generators_start_at_the_model_and_learn_per_structure():
    model, x, a, enc, net = _setup(Residual(), (4, 3, 8, 8))
    assert_close_outputs(model, net.materialize(enc.full()), x, rtol=1e-6)
    net.train()
    out = net(x)  # a random structure
    out.sum().backward()
    grads = [g.fc2.weight.grad for g in net.generators.values()]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)
    assert all(b.grad is not None for b in net.banks.values())
    with pytest.raises(fxprune.ConfigError, match="genome="):
        net.eval()(x)


def test_write_back_makes_the_rewrite_rebuild_the_same_network():
    model, x, a, enc, net = _setup(Residual(), (4, 3, 8, 8))
    _randomize_generators(net)
    genome = enc.random(np.random.default_rng(2))
    slim = net.materialize(genome)
    with torch.no_grad():
        for b in slim.buffers():
            if b.is_floating_point():
                b.add_(torch.rand(b.shape))  # as if recalibrated
    write_back(a.channels, slim, enc.keep_roots(genome))
    rebuilt, check = fxprune.prune_with_plan(a, PruningPlan(keep=enc.keep(genome)))
    assert check.passed
    assert_close_outputs(slim, rebuilt, x, rtol=1e-6)


def _loader(n=96, shape=(3, 8, 8), classes=4, bs=16, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    ds = TensorDataset(x, y) if labels else TensorDataset(x)
    return DataLoader(ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))


_Head = ResidualClassifier


def test_split_holds_out_disjoint_data():
    dl = _loader(100)
    train, held = split_data(dl, 0.2, seed=0)
    a = {tuple(x.flatten()[:4].tolist()) for xb, _ in train for x in xb}
    b = {tuple(x.flatten()[:4].tolist()) for xb, _ in held for x in xb}
    assert len(a) == 80 and len(b) == 20 and not a & b
    batches = list(_loader(64, bs=16))
    train, held = split_data(batches, 0.25, seed=0)
    assert len(train) == 3 and len(held) == 1
    with pytest.raises(TrainingError, match="at least 2"):
        split_data(batches[:1], 0.1, 0)


@pytest.mark.parametrize("flops", [0.6, 0.3])
def test_compress_meets_the_target_with_the_search_history(flops):
    torch.manual_seed(0)
    model = _Head().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slim = fxprune.compress(model, "metapruning", torch.randn(2, 3, 8, 8), flops, data=_loader(), options=SMALL)
    r = slim.fxprune_report
    assert r.macs_after <= flops * r.macs_before and r.max_rel_error <= 1e-4
    assert measured_macs(slim, torch.randn(2, 3, 8, 8)) == r.macs_after
    d = r.details
    assert d["macs_ratio"] == pytest.approx(r.macs_ratio) and d["flops"] == 2 * d["macs"]
    hist = d["search"]["history"]
    assert len(hist) == 2 and {"best_accuracy", "mean_accuracy", "best_macs_ratio", "mean_macs_ratio"} <= set(hist[0])
    assert all(row["best_macs_ratio"] <= flops + 1e-9 for row in hist)
    for w in d["widths"]:  # the reported widths are the slim model's (leading members are conv rows here)
        assert get_tensor(slim, w["leading"]).shape[0] == w["kept_channels"]
    # the returned model is the scored one: same held-out split, same accuracy and loss
    held = split_data(_loader(), MetaPruningOptions().holdout, seed=0)[1]
    scored = evaluate(slim, held)
    assert scored["accuracy"] == d["search"]["best"]["accuracy"]
    assert scored["loss"] == pytest.approx(d["search"]["best"]["loss"], rel=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    assert not model.training and not slim.training


def test_params_and_min_flops_limits_hold():
    torch.manual_seed(0)
    model = _Head().eval()
    slim = fxprune.compress(model, "metapruning", torch.randn(2, 3, 8, 8), 0.8, data=_loader(),
                            options=dict(SMALL, params=0.5, min_flops=0.3, init_ratio_range=(0.46, 0.79)))
    r = slim.fxprune_report
    assert r.params_after <= 0.5 * r.params_before
    assert 0.3 * r.macs_before <= r.macs_after <= 0.8 * r.macs_before


def test_pruningnet_trains_in_rounds_until_sampled_structures_score_the_target():
    """An unreachable accuracy runs every round and reports each; a reachable one stops early."""
    torch.manual_seed(0)
    model, x = _Head().eval(), torch.randn(2, 3, 8, 8)
    opts = dict(SMALL, epochs=1, pruningnet_until=1.0, pruningnet_max_rounds=3, pruningnet_probe=2)
    d = fxprune.compress(model, "metapruning", x, 0.6, data=_loader(), options=opts).fxprune_report.details
    rounds = d["pruningnet_heldout"]
    assert [r["epochs"] for r in rounds] == [1, 2, 3] and len(d["pruningnet_training"]) == 3
    assert all(r["structures"] == 2 and 0 <= r["heldout_accuracy"] <= 1 for r in rounds)
    first = rounds[0]["heldout_accuracy"]
    d = fxprune.compress(model, "metapruning", x, 0.6, data=_loader(),
                         options=dict(opts, pruningnet_until=max(first, 1e-6))).fxprune_report.details
    assert len(d["pruningnet_heldout"]) == 1 and len(d["pruningnet_training"]) == 1
    with pytest.raises(fxprune.ConfigError, match="pruningnet_until"):
        fxprune.compress(model, "metapruning", x, 0.6, data=_loader(), options=dict(SMALL, pruningnet_until=1.5))


def test_a_generated_weight_moves_by_the_step_gain_times_a_plain_step():
    """The PruningNet starts at the model's weights (second Linear: bias = weight, matrix = 0), and
    one SGD step then moves the generated weight by lr x (1 + |h|^2) x its gradient, not lr x it:
    the bias and the matrix both follow the gradient. The gain is several-fold at the default
    initialisation, which is why a trained model's PruningNet needs a fine-tuning lr (a trained
    ResNet-20 on MNIST lost 85 points in its first epoch at the authors' lr 0.1)."""
    from fxprune.passes.pruningnet import WeightGenerator

    torch.manual_seed(0)
    base = torch.randn(8, 4, 3, 3) * 0.1
    gen = WeightGenerator([0, 1], base, hidden=32)
    ratios = torch.tensor([0.4, 0.7])
    w = gen(ratios)
    assert torch.equal(w.detach(), base)  # the model's own weight at the start
    grad = torch.randn_like(w)
    (w * grad).sum().backward()
    lr = 0.01
    torch.optim.SGD(gen.parameters(), lr=lr).step()
    moved = gen(ratios).detach() - base
    gain = gen.step_gain(ratios)
    assert gain > 1 and torch.allclose(moved, -lr * gain * grad, rtol=1e-4, atol=1e-7)
    gains = [WeightGenerator([0, 1, 2], base, 32).step_gain(torch.rand(3) * 0.9 + 0.1) for _ in range(50)]
    assert 1.5 < float(np.median(gains)) < 20  # the hidden ReLUs of a default Linear(3 -> 32): |h|^2 of a few


def _easy_loader(n=128, bs=16, seed=0):
    """Two classes told apart by the sign of every pixel: any structure learns it in an epoch or two,
    so a held-out target of 0.9 is reached (random labels never reach one)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.3 * torch.randn(n, 3, 8, 8, generator=g) + (2 * y - 1).float().view(-1, 1, 1, 1)
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _limit(enc, a, flops, min_flops=None):
    from fxprune.constraints import Constraints
    from fxprune.methods.metapruning.method import _GenomeLimits

    return _GenomeLimits(enc, a.cost, Constraints(flops=flops), MetaPruningOptions(min_flops=min_flops))


def test_the_feasible_sampler_only_draws_structures_under_the_limit():
    """Every draw meets a limit that few uniform draws meet; with two limits each draw meets one
    of them and both are used."""
    from fxprune.methods.metapruning.method import pruningnet_sampler

    model, x, a, enc, _net = _setup(_Head(), (2, 3, 8, 8))
    total = a.cost.total_macs
    tight = _limit(enc, a, 0.2)
    rng = np.random.default_rng(0)
    assert np.mean([tight(enc.random(rng)) for _ in range(200)]) < 0.5  # uniform draws mostly miss it
    sample = pruningnet_sampler(enc, [tight])
    drawn = [sample(rng) for _ in range(200)]
    assert all(tight(g) for g in drawn) and len(set(drawn)) > 20  # feasible, and not one structure
    loose = _limit(enc, a, 0.6)
    both = pruningnet_sampler(enc, [loose, tight])
    macs = [enc.macs(a.cost, both(rng)) / total for _ in range(200)]
    assert max(macs) <= 0.6 and any(m > 0.2 for m in macs) and sum(m <= 0.2 for m in macs) > 50
    with pytest.raises(fxprune.ConfigError, match="feasibility check"):
        pruningnet_sampler(enc, [])


def test_pruningnet_sampling_and_pretrain_targets_are_validated():
    model, x = _Head().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(fxprune.ConfigError, match="choose from uniform, feasible"):
        MetaPruningOptions(pruningnet_sampling="thin")
    with pytest.raises(fxprune.ConfigError, match=r"needs flops= .*flops=\(0.25, 0.1\)"):
        pretrain(model, x, _loader(), dict(epochs=1, pruningnet_sampling="feasible"))
    with pytest.raises(fxprune.ConfigError, match=r"flops=\(0.5, 1.5\): give MACs fractions in \(0, 1\]"):
        pretrain(model, x, _loader(), dict(epochs=1), flops=(0.5, 1.5))
    with pytest.raises(fxprune.ConfigError, match=r"band=1.0: give a fraction in \[0, 1\)"):
        pretrain(model, x, _loader(), dict(epochs=1), flops=0.5, band=1.0)
    with pytest.raises(fxprune.TargetUnreachableError):  # before any training
        pretrain(model, x, _loader(), dict(epochs=1), flops=(0.5, 1e-4))


def test_pretrain_probes_each_target_within_its_band_every_round(monkeypatch):
    """flops=(0.5, 0.3), band=0.3: each round scores `pruningnet_probe` structures in [0.7 t, t]
    for each target (the same ones every round), records them per target with min / median and
    the training time, and the check reads the lower of the two means."""
    from fxprune.methods.metapruning import method

    model, x, a, enc, _net = _setup(_Head(), (2, 3, 8, 8))
    probed = []
    real = method.sampled_structures

    def recording(encoding, feasible, n, seed):
        found = real(encoding, feasible, n, seed)
        probed.append([encoding.macs(a.cost, g) / a.cost.total_macs for g in found])
        return found

    monkeypatch.setattr(method, "sampled_structures", recording)
    opts = dict(epochs=1, pruningnet_until=1.0, pruningnet_max_rounds=2, pruningnet_probe=3, calib_batches=2)
    net = pretrain(model, x, _loader(), opts, flops=(0.5, 0.3), band=0.3)
    assert [r["epochs"] for r in net.heldout] == [1, 2] and len(net.history.epochs) == 2
    assert len(probed) == 4 and probed[0] == probed[2] and probed[1] == probed[3]  # per round: 0.5, then 0.3
    for ratios, t in zip(probed, (0.5, 0.3, 0.5, 0.3)):
        assert len(ratios) == 3 and all(0.7 * t - 1e-9 <= r <= t + 1e-9 for r in ratios)
    for r in net.heldout:
        per = r["per_target"]
        assert [t["flops"] for t in per] == [0.5, 0.3] and [len(t["accuracy"]) for t in per] == [3, 3]
        every = per[0]["accuracy"] + per[1]["accuracy"]
        assert r["structures"] == 6 and r["min"] == min(every) and r["median"] == pytest.approx(np.median(every))
        assert r["heldout_accuracy"] == pytest.approx(min(np.mean(t["accuracy"]) for t in per))
    assert 0 < net.heldout[0]["seconds"] < net.heldout[1]["seconds"]  # training time so far


def test_pruningnet_until_stops_once_the_sampled_structures_reach_it():
    """On data every structure can learn, feasible sampling reaches 0.9 held-out at both targets
    before the last allowed round, and stops there; the earlier rounds were below it."""
    torch.manual_seed(0)
    model, x = _Head().eval(), torch.randn(2, 3, 8, 8)
    opts = dict(epochs=1, lr=0.05, pruningnet_sampling="feasible", pruningnet_until=0.9, pruningnet_max_rounds=4,
                pruningnet_probe=3, calib_batches=2, holdout=0.25)
    net = pretrain(model, x, _easy_loader(), opts, flops=(0.5, 0.3), band=0.3)
    rounds = net.heldout
    assert len(rounds) < 4 and len(net.history.epochs) == len(rounds)
    assert rounds[-1]["heldout_accuracy"] >= 0.9 and all(r["heldout_accuracy"] < 0.9 for r in rounds[:-1])
    assert all(np.mean(t["accuracy"]) >= 0.9 for t in rounds[-1]["per_target"])


def test_feasible_sampling_trains_the_pruningnet_and_leaves_the_model_untouched(monkeypatch):
    """compress(..., pruningnet_sampling="feasible"): every training mini-batch runs a structure
    under the target (without the band's lower limit), the PruningNet learns (training accuracy
    rises), the check reports the target's probes, and the user's model is not modified."""
    from fxprune.methods.metapruning import method

    torch.manual_seed(0)
    model, x = _Head().train(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    drawn, real = [], method.pruningnet_sampler

    def recording(encoding, limits):
        sample = real(encoding, limits)
        return lambda rng: drawn.append((limits, sample(rng))) or drawn[-1][1]

    monkeypatch.setattr(method, "pruningnet_sampler", recording)
    opts = dict(SMALL, epochs=3, lr=0.05, pruningnet_sampling="feasible", pruningnet_until=0.5, pruningnet_probe=3,
                min_flops=0.35, holdout=0.25)
    slim = fxprune.compress(model, "metapruning", x, 0.4, data=_easy_loader(), options=opts)
    d = slim.fxprune_report.details
    assert len(drawn) == 3 * 6  # one structure per mini-batch: 3 epochs of 96 training images in batches of 16
    for limits, genome in drawn:
        (limit,) = limits
        assert limit.min_macs is None and limit(genome)
    ratios = [limits[0].encoding.macs(limits[0].cost, g) / limits[0].cost.total_macs for limits, g in drawn]
    assert max(ratios) <= 0.4 and min(ratios) < 0.35  # under the target, not held to the band
    accuracy = [e["accuracy"] for e in d["pruningnet_training"]]
    assert accuracy[-1] > accuracy[0] + 0.2
    (r,) = d["pruningnet_heldout"]
    assert r["per_target"][0]["flops"] == 0.4 and r["structures"] == 3 and r["heldout_accuracy"] >= 0.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.training
    monkeypatch.undo()
    net = pretrain(model, x, _easy_loader(), dict(epochs=1, pruningnet_sampling="feasible"), flops=0.4)
    (limit,) = net.sampler.limits  # the target's limit stays readable on the PruningNet
    assert limit.max_macs == pytest.approx(0.4 * limit.cost.total_macs) and limit.min_macs is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.training


def test_reused_pruningnet_and_final_training():
    torch.manual_seed(0)
    model, x = _Head().eval(), torch.randn(2, 3, 8, 8)
    net = pretrain(model, x, _loader(), dict(epochs=1))
    assert len(net.history.epochs) == 1
    for final in ("finetune", "scratch"):
        slim = fxprune.compress(model, "metapruning", x, 0.5, data=_loader(),
                                options=dict(SMALL, pruningnet=net, final=final, final_epochs=1))
        d = slim.fxprune_report.details
        assert d["pruningnet_training"] == "reused" and len(d["final_training"]) == 1
        assert slim.fxprune_report.macs_ratio <= 0.5 and slim.fxprune_report.max_rel_error <= 1e-4
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with pytest.raises(fxprune.ConfigError, match="another model"):
        fxprune.compress(other, "metapruning", x, 0.5, data=_loader(), options=dict(SMALL, pruningnet=net))


def test_unlabelled_batches_are_labelled_by_the_original_model():
    torch.manual_seed(0)
    slim = fxprune.compress(_Head().eval(), "metapruning", torch.randn(2, 3, 8, 8), 0.6,
                            data=_loader(labels=False), options=SMALL)
    assert slim.fxprune_report.macs_ratio <= 0.6


@pytest.fixture
def _cache(tmp_path, monkeypatch):
    """Latency models profiled by compress go to a private cache, never the user's."""
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latency"


def _fake_timer(call: TimedCall) -> float:
    """Seconds growing with the channels of a layer and with the kept units of a whole model."""
    if call.kind == "layer":
        return 1e-6 + 1e-8 * (call.in_channels or 1) * (call.out_channels or 1)
    return 2e-5 + 1e-6 * sum(call.kept.values())


def _head_latency(tmp_path, batch=None):
    torch.manual_seed(0)
    model, x = _Head().eval(), torch.randn(1, 3, 8, 8)
    a = fxprune.analyze(model, x)
    return model, x, a, profile_latency(a, timer=_fake_timer, batch=batch, points=3, cache_dir=tmp_path)


class _Untouchable(TensorDataset):
    """Training data that must not be read: the limits are checked before the PruningNet trains."""

    def __getitem__(self, i):
        raise AssertionError("the PruningNet trained before an unreachable limit was reported")


def test_genome_latency_is_the_latency_model_on_the_kept_units(tmp_path):
    _, _, a, lat = _head_latency(tmp_path)
    enc = build_encoding(a.channels)
    assert sorted(enc.groups) == sorted(lat.n_units)  # one gene per group the latency model knows
    rng = np.random.default_rng(0)
    for genome in (enc.full(), enc.smallest(), enc.random(rng), enc.random(rng)):
        kept = genome_kept(enc, genome)
        assert kept == {w["group"]: w["kept_units"] for w in enc.describe(genome)}
        assert lat.predict(kept) == pytest.approx(lat.predict({g: len(k) for g, k in enc.keep(genome).items()}))
    assert lat.predict(genome_kept(enc, enc.full())) == pytest.approx(lat.predict({}))
    assert lat.predict(genome_kept(enc, enc.full())) > lat.predict(genome_kept(enc, enc.smallest()))


def _measured_as_predicted(monkeypatch, lat, factor=lambda predicted: 1.0):
    """The slim models "measured" as the fake-timer latency model predicts them (x `factor`): a real
    clock cannot meet a limit in the fake timer's microseconds. Returns the list of measurements."""
    from fxprune.methods.metapruning import method as mp

    seen = []

    def measure(context, plan, latency_model=None):
        predicted = lat.predict({g: len(k) for g, k in plan.keep.items()})
        seen.append(predicted * factor(predicted))
        return seen[-1]

    monkeypatch.setattr(mp, "slim_latency", measure)
    return seen


def test_latency_limit_is_met_by_prediction_and_reported(tmp_path, _cache, monkeypatch):
    model, x, a, lat = _head_latency(tmp_path)
    _measured_as_predicted(monkeypatch, lat)
    enc = build_encoding(a.channels)
    full, small = lat.predict({}), lat.predict(genome_kept(enc, enc.smallest()))
    limit = (full + small) / 2
    slim = fxprune.compress(model, "metapruning", x, 1.0, data=_loader(), latency_ms=limit * 1e3,
                            options=dict(SMALL, latency_model=lat))
    d = slim.fxprune_report.details
    lat_d = d["latency"]
    assert lat_d["target_s"] == pytest.approx(limit, rel=1e-12) and lat_d["fraction"] is None
    assert lat_d["predicted_after_s"] <= limit * (1 + 1e-9)
    # the search's prediction is the latency model's on the reported widths
    assert lat_d["genome_predicted_s"] == pytest.approx(lat_d["predicted_after_s"], rel=1e-12)
    assert lat.predict({w["group"]: w["kept_units"] for w in d["widths"]}) == pytest.approx(lat_d["predicted_after_s"])
    assert lat_d["predicted_before_s"] == pytest.approx(full) and lat_d["measured_before_s"] == lat.original_s
    assert 0 < lat_d["measured_after_s"] <= limit and lat_d["measured_within_target"]
    assert len(lat_d["rounds"]) == 1 and d["search"]["chosen"]["is_search_best"]
    assert lat_d["latency_model"]["source"] == "reused" and lat_d["on"].startswith("cpu")
    assert "latency predicted" in slim.fxprune_report.table()
    assert not any(_cache.glob("*.json"))  # a reused model is not profiled again
    untouchable = DataLoader(_Untouchable(torch.zeros(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(LatencyUnreachableError, match="is unreachable") as info:
        fxprune.compress(model, "metapruning", x, 1.0, data=untouchable, latency_ms=1e-6,
                         options=dict(SMALL, latency_model=lat))
    err = info.value
    assert err.target_s == pytest.approx(1e-9) and err.best_s == pytest.approx(small)
    assert err.original_s == lat.original_s and not err.measured
    with pytest.raises(LatencyUnreachableError):  # a fraction below the smallest widths' prediction
        fxprune.compress(model, "metapruning", x, 1.0, data=untouchable, latency=small / lat.original_s * 0.99,
                         options=dict(SMALL, latency_model=lat))


def test_a_structure_measured_over_the_limit_gives_way_to_the_next_best_measured_under(tmp_path, _cache,
                                                                                       monkeypatch):
    """The latency model underestimates the larger structures (measured 1.25x where predicted over 80 %
    of the limit): the search's best is measured over, so the predicted limit shrinks and the best
    scored structure the search evaluated under it is taken, measured under the limit; every round
    is reported. If every structure is measured over, LatencyUnreachableError with the best value."""
    model, x, a, lat = _head_latency(tmp_path)
    enc = build_encoding(a.channels)
    full, small = lat.predict({}), lat.predict(genome_kept(enc, enc.smallest()))
    limit = (full + small) / 2
    seen = _measured_as_predicted(monkeypatch, lat, lambda predicted: 1.25 if predicted > 0.8 * limit else 1.0)
    slim = fxprune.compress(model, "metapruning", x, 1.0, data=_loader(), latency_ms=limit * 1e3,
                            options=dict(SMALL, latency_model=lat))
    d = slim.fxprune_report.details
    lat_d = d["latency"]
    assert seen[0] > limit, "the search's best was expected to be predicted over 80 % of the limit"
    assert len(lat_d["rounds"]) >= 2 and lat_d["rounds"][0]["measured_s"] == seen[0]
    assert lat_d["measured_after_s"] == seen[-1] <= limit and lat_d["measured_within_target"]
    assert not d["search"]["chosen"]["is_search_best"]
    assert lat_d["predicted_after_s"] <= 0.8 * limit * (1 + 1e-9)
    assert lat.predict({w["group"]: w["kept_units"] for w in d["widths"]}) == pytest.approx(lat_d["predicted_after_s"])
    _measured_as_predicted(monkeypatch, lat, lambda predicted: 10.0)
    with pytest.raises(LatencyUnreachableError) as info:
        fxprune.compress(model, "metapruning", x, 1.0, data=_loader(), latency_ms=limit * 1e3,
                         options=dict(SMALL, latency_model=lat))
    assert info.value.measured and info.value.best_measured_s > limit


def test_latency_as_a_fraction_of_the_measured_original(tmp_path, _cache, monkeypatch):
    model, x, _, lat = _head_latency(tmp_path)
    with monkeypatch.context() as patched:
        _measured_as_predicted(patched, lat)
        slim = fxprune.compress(model, "metapruning", x, 1.0, data=_loader(), latency=0.9,
                                options=dict(SMALL, latency_model=lat))
    d = slim.fxprune_report.details["latency"]
    assert d["fraction"] == 0.9 and d["measured_before_s"] == lat.original_s
    assert d["target_s"] == pytest.approx(0.9 * lat.original_s, rel=1e-12)
    assert d["predicted_after_s"] <= d["target_s"] * (1 + 1e-9)
    # without latency_model= the model is profiled on the device (a real CPU profile, in the private
    # cache, with latency_rounds as profile_latency's rounds), and the fraction is of its measurement
    torch.manual_seed(0)
    big = torch.randn(16, 3, 32, 32)  # compute, not call overhead, sets this model's time (so 0.9 is reachable)
    slim = fxprune.compress(model, "metapruning", big, 1.0, data=_loader(), latency=0.9,
                            options=dict(SMALL, latency_rounds=1))
    d = slim.fxprune_report.details["latency"]
    assert d["fraction"] == 0.9 and d["measured_before_s"] > 0 and d["measured_after_s"] > 0
    assert d["target_s"] == pytest.approx(0.9 * d["measured_before_s"], rel=1e-12)
    assert d["predicted_after_s"] <= d["target_s"] * (1 + 1e-9)
    assert d["latency_model"]["source"] in ("measured", "cache")
    (entry,) = _cache.glob("*.json")
    key = json.loads(entry.read_text())["key"]
    assert key["grid"]["rounds"] == 1 and key["device"] == "cpu" and key["timer"] is None


def test_reused_latency_model_must_be_of_this_model_and_these_settings(tmp_path, _cache, monkeypatch):
    model, x, _, lat = _head_latency(tmp_path)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    other_lat = profile_latency(fxprune.analyze(other, x), timer=_fake_timer, points=3, cache_dir=tmp_path)
    with pytest.raises(fxprune.ConfigError, match="another model"):
        fxprune.compress(model, "metapruning", x, 1.0, data=_loader(), latency=0.9,
                         options=dict(SMALL, latency_model=other_lat))
    _, _, _, batch4 = _head_latency(tmp_path, batch=4)
    with pytest.raises(fxprune.ConfigError, match="batch=4"):
        fxprune.compress(model, "metapruning", x, 1.0, data=_loader(), latency=0.9,
                         options=dict(SMALL, latency_model=batch4))
    _measured_as_predicted(monkeypatch, batch4)  # the fake timer's microseconds, not a real clock's
    slim = fxprune.compress(model, "metapruning", x, 1.0, data=_loader(), latency=0.9, batch=4,
                            options=dict(SMALL, latency_model=batch4))  # measured as profiled: accepted
    assert slim.fxprune_report.details["latency"]["on"] == "cpu, batch 4, model dtype"
    with pytest.raises(fxprune.ConfigError, match="LatencyModel"):
        MetaPruningOptions(latency_model="table.json")
    with pytest.raises(fxprune.ConfigError, match="latency_rounds"):
        MetaPruningOptions(latency_rounds=0)
    with pytest.raises(fxprune.ConfigError, match="unknown metapruning option"):
        fxprune.compress(model, "metapruning", x, 1.0, data=_loader(), latency=0.9,
                         options=dict(SMALL, latency_table=lat))
    assert not any(_cache.glob("*.json"))


def test_bad_input():
    model, x = _Head().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(TrainingError, match="needs data="):
        fxprune.compress(model, "metapruning", x, 0.5)
    with pytest.raises(fxprune.ConfigError, match="unknown metapruning option"):
        fxprune.compress(model, "metapruning", x, 0.5, data=_loader(), options={"epoch": 3})
    with pytest.raises(fxprune.ConfigError, match="final"):
        MetaPruningOptions(final="sometimes")
    with pytest.raises(fxprune.ConfigError, match="holdout"):
        MetaPruningOptions(holdout=1.5)
    with pytest.raises(fxprune.ConfigError, match="ratios"):
        fxprune.compress(model, "metapruning", x, 0.5, data=_loader(), options=dict(SMALL, ratios=(0.0, 1.5)))
    with pytest.raises(fxprune.TargetUnreachableError, match="flops=0.0010"):
        fxprune.compress(model, "metapruning", x, 0.001, data=_loader(), options=SMALL)
    with pytest.raises(fxprune.ConfigError, match="latency"):
        fxprune.compress(model, "metapruning", x, 0.5, data=_loader(), latency=1.5, options=SMALL)
    with pytest.raises(fxprune.LatencyUnreachableError, match="before training"):  # refused before GAL trains
        fxprune.compress(model, "gal", x, 0.5, data=_loader(), latency=0.01, options={"structures": ("channel",)})


def test_round_to_auto_is_refused():
    with pytest.raises(fxprune.ConfigError, match="metapruning does not support round_to='auto'"):
        fxprune.compress(_Head().eval(), "metapruning", torch.randn(2, 3, 8, 8), 0.5, data=_loader(),
                         round_to="auto", options=SMALL)


def test_a_sharded_loader_keeps_its_training_part_sharded_and_scores_on_whole_batches():
    """torchrun: the training part stays sharded like the user's loader; the held-out batches and
    the BN-recalibration batches are the whole data on every rank, as without torchrun."""
    from torch.utils.data.distributed import DistributedSampler

    from fxprune.methods.metapruning.method import _first, unsharded

    plain = _loader()
    single_train, single_held = split_data(plain, 0.25, seed=5)  # 72 training samples: 36 a rank
    shards, seen = [], []
    for rank in range(2):  # a DistributedSampler with explicit replicas/rank needs no process group
        sampled = DataLoader(plain.dataset, batch_size=16, sampler=DistributedSampler(plain.dataset, 2, rank, seed=3))
        train, held = split_data(sampled, 0.25, seed=5)
        s = train.sampler
        assert isinstance(s, DistributedSampler) and (s.num_replicas, s.rank, s.shuffle, s.seed) == (2, rank, True, 3)
        assert train.dataset.indices == single_train.dataset.indices and len(train.dataset) == len(s) * 2
        shards.append(set(s))
        seen.append([torch.equal(a, b) for (a, _), (b, _) in zip(held, single_held)])
        whole = [x for x, _ in _first(unsharded(train, 5), None, 5)]
        alone = [x for x, _ in _first(single_train, None, 5)]
        assert len(whole) == len(alone) and all(torch.equal(a, b) for a, b in zip(whole, alone))
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == len(single_train.dataset)
    assert all(all(row) and row for row in seen)
    assert unsharded(plain, 0) is plain
