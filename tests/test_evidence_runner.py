"""The method-evidence runner (benches/experiments/evidence): every cell of a spec runs, lands
within 1 % of its MACs target, is written once (resumable), and the docs tables are regenerated
between their markers with intervals and paired differences. Synthetic data: no download."""
from __future__ import annotations

import json
import math

import pytest

from benches.experiments.evidence.__main__ import main
from benches.experiments.evidence.report import BEGIN, END
from benches.experiments.evidence.run import load_records, run_all
from benches.experiments.evidence.spec import load_spec
from benches.experiments.evidence.stats import mean_ci, paired, t975
from fxprune.errors import ConfigError

SPEC = """
[settings]
dataset = "synthetic"
seeds = [0, 1]
test_images = 200
batch = 32
threads = 2

[data]
baseline = 512
finetune = 128
method = 128
tick = 64
unlabelled = 128
heldout = 48

[data.lowdata]
finetune = 64

[baseline]
epochs = 2
lr = 0.05
schedule = "cosine"

[finetune]
epochs = 1
lr = 0.01
schedule = "constant"

[scratch]
epochs = 1
lr = 0.05
schedule = "cosine"

[methods.uniform]
method = "uniform"

[methods.l1]
method = "l1"

[methods.gd_tick_tock]
method = "gate_decorator"
data = "tick"
tock_data = "method"
options = { schedule = "tick_tock", p = 0.3, T = 2, tock_epochs = 1 }

[methods.gal_channel]
method = "gal"
data = "unlabelled"
options = { structures = ["channel"], epochs = 2, mask_step = 1, flops_weighted = 0.5 }

[methods.metapruning]
method = "metapruning"
data = "method"
search_data = "heldout"
band = 0.01
options = { epochs = 1, population = 6, generations = 2, parents = 3, mutations = 2, crossovers = 2, calib_batches = 1, eval_batches = 1, holdout = 0.3, pruningnet_until = 0.99, pruningnet_max_rounds = 2, pruningnet_probe = 2, pruningnet_sampling = "feasible" }

[[experiments]]
name = "tiny"
model = "vgg_bn"
targets = [0.3]
methods = ["uniform", "l1", "gd_tick_tock", "gal_channel", "metapruning"]
after = ["none", "finetune", "scratch"]
compare = [["gd_tick_tock", "uniform"], ["gal_channel", "l1"]]

[[experiments]]
name = "tiny_mp"
model = "vgg_bn"
targets = [0.3, 0.2]
methods = ["metapruning"]
after = ["none"]
seeds = [0]

[[experiments]]
name = "tiny_lowdata"
model = "vgg_bn"
targets = [0.3]
methods = ["uniform"]
data = "lowdata"
seeds = [0]

[quick.data]
baseline = 256
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    (root / "spec.toml").write_text(SPEC)
    spec = load_spec(root / "spec.toml")
    written = run_all(spec, root / "out", log=lambda _m: None)
    return root, spec, written


def test_every_cell_runs_once_at_equal_macs(ran):
    root, spec, written = ran
    assert len(written) == 5 * 2 + 2 + 1
    records = load_records(root / "out")
    assert [r for r in records if "error" in r] == []
    for r in records:
        assert r["budget_ok"] and 0.99 * r["target"] <= r["macs_ratio"] <= r["target"], r
        assert r["params_ratio"] < 1
        for acc in r["accuracy"].values():
            assert math.isfinite(acc) and 0 <= acc <= 1
    tiny = [r for r in records if r["experiment"] == "tiny"]
    assert {tuple(sorted(r["accuracy"])) for r in tiny} == {("finetune", "none", "scratch")}
    assert all(r["baseline_accuracy"] > 0.8 for r in records)  # the baselines learned the task
    # every method of a seed started from the same baseline
    assert len({(r["seed"], r["baseline_accuracy"]) for r in tiny}) == 2
    mp = next(r for r in tiny if r["method"] == "metapruning")
    assert mp["summary"]["evaluated"] >= 1
    # one PruningNet per seed serves both targets of an experiment
    shared = [r["summary"] for r in records if r["experiment"] == "tiny_mp"]
    assert len(shared) == 2 and all(s["pruningnet_shared"] for s in shared)
    assert shared[0]["pruningnet_train_accuracy"] is None
    # ... trained on structures under both targets and checked at each, within the band, every round
    assert shared[0]["pruningnet_heldout"] == shared[1]["pruningnet_heldout"]
    for r in shared[0]["pruningnet_heldout"]:
        assert [t["flops"] for t in r["per_target"]] == [0.3, 0.2] and r["structures"] == 4


def test_finished_runs_are_kept_and_only_missing_ones_rerun(ran):
    root, spec, _ = ran
    out = root / "out"
    record = out / "runs" / "tiny" / "l1-t0.3-s1.json"
    before = json.loads(record.read_text())
    (out / "runs" / "tiny" / "uniform-t0.3-s0.json").unlink()
    again = run_all(spec, out, log=lambda _m: None)
    assert [p.name for p in again] == ["uniform-t0.3-s0.json"]
    assert json.loads(record.read_text()) == before


def test_docs_tables_are_regenerated_between_markers(ran):
    root, _, _ = ran
    doc = root / "results.md"
    doc.write_text("# Results\n\nintro kept\n\n" + BEGIN + "\nold table\n" + END + "\n\n## Older section kept\n")
    assert main(["--spec", str(root / "spec.toml"), "--out", str(root / "out"), "--docs", str(doc),
                 "--report-only"]) == 0
    text = doc.read_text()
    assert "intro kept" in text and "## Older section kept" in text and "old table" not in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "### tiny: vgg_bn at 0.3 of the MACs (full data)" in text
    assert "### tiny_lowdata: vgg_bn at 0.3 of the MACs (lowdata regime)" in text
    assert "### tiny_mp: vgg_bn at 0.2 of the MACs (full data)" in text
    for method in ("uniform", "l1", "gd_tick_tock", "gal_channel", "metapruning"):
        assert f"| {method} " in text
    assert "Δ vs uniform" in text and "acc % from scratch" in text
    # the experiment's `compare` pairs: paired by seed, with the interval of the difference
    records = [r for r in load_records(root / "out") if r["experiment"] == "tiny" and "error" not in r]
    acc = {m: {r["seed"]: r["accuracy"]["finetune"] for r in records if r["method"] == m} for m in ("gd_tick_tock", "uniform")}
    d = paired(acc["gd_tick_tock"], acc["uniform"])
    row = next(line for line in text.splitlines() if line.startswith("| gd_tick_tock vs uniform "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[2] == d.format()
    assert cells[3] == ("above" if d.low > 0 else "below" if d.high < 0 else "includes 0")
    assert len(cells[5].split(", ")) == 2
    assert any(line.startswith("| gal_channel vs l1 ") for line in text.splitlines())
    # the PruningNet check of each experiment with metapruning: a row per seed and round, a column per target
    check = text.split("#### tiny_mp: the PruningNet's held-out accuracy")[1].split("###")[0]
    rows = [line for line in check.splitlines() if line.startswith("| metapruning ")]
    assert "held-out at 0.3: mean (min-max)" in check and "held-out at 0.2: mean (min-max)" in check
    assert 1 <= len(rows) <= 2 and all("n=2)" in row and "(0.99)" in row for row in rows)


def test_a_failing_cell_is_recorded_and_the_batch_goes_on(tmp_path):
    bad = SPEC.replace('options = { schedule = "tick_tock", p = 0.3', 'options = { schedule = "nope", p = 0.3')
    (tmp_path / "spec.toml").write_text(bad.replace("seeds = [0, 1]", "seeds = [0]"))
    spec = load_spec(tmp_path / "spec.toml")
    written = run_all(spec, tmp_path / "out", only=["tiny"], log=lambda _m: None)
    records = {r["method"]: r for r in load_records(tmp_path / "out")}
    assert len(written) == 5 and "unknown gate_decorator schedule" in records["gd_tick_tock"]["error"]
    assert "error" not in records["l1"]


def test_bad_specs_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.replace('model = "vgg_bn"', 'model = "vgg_nope"', 1))
    with pytest.raises(ConfigError, match="unknown model 'vgg_nope'"):
        load_spec(path)
    path.write_text(SPEC.replace('data = "tick"', 'data = "ticks"'))
    with pytest.raises(ConfigError, match="choose a data role"):
        load_spec(path)
    path.write_text(SPEC.replace('["gal_channel", "l1"]', '["gal_channel", "random"]'))
    with pytest.raises(ConfigError, match="each entry is \\[method, other\\], both in its methods"):
        load_spec(path)
    path.write_text(SPEC.replace("heldout = 48\n", ""))
    with pytest.raises(ConfigError, match="scores on 'heldout', which \\[data\\] does not size"):
        load_spec(path)
    path.write_text(SPEC.replace('data = "lowdata"', 'data = "tiny_data"'))
    with pytest.raises(ConfigError, match=r"has no \[data.tiny_data\] table"):
        load_spec(path)


def test_unknown_experiments_are_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "spec.toml").write_text(SPEC)
    with pytest.raises(SystemExit) as exc:
        main(["--spec", str(tmp_path / "spec.toml"), "--out", str(tmp_path / "out"), "--only", "tiny,nope"])
    assert exc.value.code == 2 and "unknown experiments ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_experiment_may_lengthen_its_fine_tune(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC.replace('data = "lowdata"\nseeds = [0]', 'data = "lowdata"\nseeds = [0]\nfinetune = { epochs = 3 }'))
    spec = load_spec(tmp_path / "spec.toml")
    assert [e.finetune for e in spec.experiments] == [{}, {}, {"epochs": 3}]


def test_quick_merges_its_tables_over_the_spec(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    assert load_spec(tmp_path / "spec.toml", quick=True).sizes("full")["baseline"] == 256
    assert load_spec(tmp_path / "spec.toml").sizes("lowdata") == {**load_spec(tmp_path / "spec.toml").sizes("full"),
                                                                   "finetune": 64}


def test_intervals_and_paired_differences():
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.half == pytest.approx(4.303 / math.sqrt(3))
    assert t975(2) == 4.303 and t975(100) == 1.96
    assert mean_ci([0.5]).format() == "50.00 (n=1)"
    d = paired({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.7, 2: 0.6, 3: 0.1})
    assert d.n == 3 and d.mean == pytest.approx(0.1) and d.half == pytest.approx(0.0, abs=1e-12)
    assert mean_ci([0.9, 0.91, 0.92]).apart_from(mean_ci([0.5, 0.51, 0.52])) == 1
    assert mean_ci([0.5, 0.9]).apart_from(mean_ci([0.6, 0.7])) == 0


def test_the_shipped_spec_covers_the_issue_regimes():
    spec = load_spec()
    names = {e.name for e in spec.experiments}
    assert {"resnet56_10", "gal_blocks_resnet56", "gal_branches_inception", "metapruning_scratch",
            "resnet20_lowdata"} <= names
    models = {e.model for e in spec.experiments}
    assert {"lenet5", "resnet20", "resnet56", "vgg_bn", "mobilenetv2_mini"} <= models
    targets = {t for e in spec.experiments for t in e.targets}
    assert {0.2, 0.1, 0.05} <= targets
    assert all(len(e.seeds) >= 3 for e in spec.experiments)
    assert spec.sizes("lowdata")["finetune"] == 1000 and spec.sizes("lowdata")["unlabelled"] == 5000


def test_the_held_out_role_is_disjoint_from_every_training_pool(tmp_path):
    """MetaPruning's structure scores (`search_data = "heldout"`) come from pool images after every
    training role's prefix: no baseline, method or fine-tune saw them."""
    from benches.experiments.evidence.run import Data

    (tmp_path / "spec.toml").write_text(SPEC)
    spec = load_spec(tmp_path / "spec.toml")
    data = Data(spec)
    train_sizes = {k: v for k, v in spec.sizes("full").items() if k != "heldout"}
    assert data.prefix == max(train_sizes.values()) == 512 and len(data.pool) == 512 + 48
    held = data.loader(48, 0, disjoint=True).dataset.indices
    assert list(held) == list(range(512, 560))
    for n in train_sizes.values():
        assert not set(held) & set(data.loader(n, 0).dataset.indices)
