"""The experiment spec: a TOML file naming models, methods, targets, data regimes and seeds.

A spec has
* ``[settings]``: seeds, test images, batch size, threads, dataset (``mnist`` or ``synthetic``,
  the latter for tests: no download, seconds);
* ``[data]``: how many training images each role gets (``baseline``, ``finetune``, ``method`` for
  the methods' own labelled training, ``tick`` for Gate Decorator's Ticks, ``unlabelled`` for
  GAL's label-free stage), and ``[data.<regime>]`` tables that replace some of them (``lowdata``);
* ``[baseline]``, ``[finetune]``, ``[scratch]``: the training schedules (`fxprune.train.TrainConfig`
  fields). Every compared model gets the same fine-tune and the same from-scratch schedule;
* ``[methods.<key>]``: ``method`` (an fxprune method name), ``options``, which data role it trains
  on (``data``, and ``tock_data`` for Gate Decorator) and ``band`` (MetaPruning: the search only
  accepts structures within this fraction under the target, so its MACs are equal to the others');
* ``[[experiments]]``: ``name``, ``model`` (an ``fxprune.nets`` name), ``targets`` (fractions of
  the MACs), ``methods`` (keys), ``after`` (which evaluations: ``none`` = straight out of the
  method, ``finetune``, ``scratch`` = the structure re-initialised and trained from scratch),
  ``data`` (a regime name or ``full``), optional ``seeds`` and ``finetune`` (fields replacing the
  shared fine-tune's, for experiments that compare against the baseline only);
* ``[quick]``: tables merged over the above by ``--quick`` (smaller data, shorter schedules).
"""
from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fxprune.errors import ConfigError
from fxprune.nets import NETS

AFTER = ("none", "finetune", "scratch")
ROLES = ("baseline", "finetune", "method", "tick", "unlabelled", "heldout")
# "heldout": images after every other role's (they are all prefixes of one permutation), which no
# baseline, method or fine-tune trains on: MetaPruning's structure scores (`search_data`)
DISJOINT_ROLES = ("heldout",)
DEFAULT_SPEC = Path(__file__).with_name("evidence.toml")


@dataclass(frozen=True)
class MethodSpec:
    key: str
    method: str
    options: dict = field(default_factory=dict)
    data: str | None = None  # the data role it trains on (None: data-free)
    tock_data: str | None = None
    band: float | None = None  # MetaPruning: min_flops = (1 - band) x target
    search_data: str | None = None  # MetaPruning: the role that scores structures (None: a split of `data`)


@dataclass(frozen=True)
class Experiment:
    name: str
    model: str
    targets: tuple
    methods: tuple
    after: tuple
    data: str
    seeds: tuple
    finetune: dict = field(default_factory=dict)  # replaces fields of [finetune] for this experiment
    compare: tuple = ()  # (method, other) pairs the report compares seed by seed, besides uniform and l1


@dataclass(frozen=True)
class Spec:
    raw: dict
    settings: dict
    experiments: tuple
    methods: dict  # key -> MethodSpec
    quick: bool

    def sizes(self, regime: str) -> dict:
        """Images per data role under `regime` (``full`` or a ``[data.<regime>]`` table)."""
        data = {k: v for k, v in self.raw["data"].items() if not isinstance(v, dict)}
        if regime != "full":
            data.update(self.raw["data"][regime])
        return data

    def schedule(self, name: str) -> dict:
        return dict(self.raw[name])

    def digest(self, *parts) -> str:
        """A short hash of the spec tables a result depends on (baseline files are keyed by it)."""
        blob = json.dumps([self.settings.get("dataset"), *parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _require(table: dict, key: str, where: str):
    if key not in table:
        raise ConfigError(f"the experiment spec's {where} needs `{key}`")
    return table[key]


def load_spec(path: str | Path = DEFAULT_SPEC, quick: bool = False) -> Spec:
    """Read and check a spec; `quick` merges its ``[quick]`` table over it."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the experiment spec {path}: {exc}") from exc
    if quick:
        raw = _merge(raw, raw.get("quick", {}))
    raw.pop("quick", None)
    for table in ("settings", "data", "baseline", "finetune", "scratch", "methods"):
        _require(raw, table, "top level")
    settings = raw["settings"]
    methods = {}
    for key, m in raw["methods"].items():
        ms = MethodSpec(key, _require(m, "method", f"[methods.{key}]"), dict(m.get("options", {})), m.get("data"),
                        m.get("tock_data"), m.get("band"), m.get("search_data"))
        if ms.search_data is not None and ms.search_data not in raw["data"]:
            raise ConfigError(f"[methods.{key}] scores on {ms.search_data!r}, which [data] does not size: add "
                              f"`{ms.search_data} = <images>` there")
        for role in (ms.data, ms.tock_data, ms.search_data):
            if role is not None and role not in ROLES:
                raise ConfigError(f"[methods.{key}] trains on {role!r}: choose a data role from {', '.join(ROLES)}")
        methods[key] = ms
    experiments = []
    for e in raw.get("experiments", []):
        name = _require(e, "name", "an [[experiments]] entry")
        model = _require(e, "model", f"experiment {name}")
        if model not in NETS:
            raise ConfigError(f"experiment {name}: unknown model {model!r}; choose from {', '.join(sorted(NETS))}")
        unknown = [k for k in e.get("methods", []) if k not in methods]
        if unknown:
            raise ConfigError(f"experiment {name}: methods {unknown} are not defined under [methods]")
        after = tuple(e.get("after", ("none", "finetune")))
        if any(a not in AFTER for a in after):
            raise ConfigError(f"experiment {name}: after={after}; choose from {', '.join(AFTER)}")
        compare = tuple(tuple(pair) for pair in e.get("compare", ()))
        bad = [pair for pair in compare if len(pair) != 2 or any(k not in e.get("methods", []) for k in pair)]
        if bad:
            raise ConfigError(f"experiment {name}: compare={bad}: each entry is [method, other], both in its methods")
        regime = e.get("data", "full")
        if regime != "full" and not isinstance(raw["data"].get(regime), dict):
            raise ConfigError(f"experiment {name}: data regime {regime!r} has no [data.{regime}] table")
        experiments.append(Experiment(name, model, tuple(float(t) for t in _require(e, "targets", f"experiment {name}")),
                                      tuple(e["methods"]), after, regime, tuple(e.get("seeds", settings["seeds"])),
                                      dict(e.get("finetune", {})), compare))
    return Spec(raw, settings, tuple(experiments), methods, quick)
