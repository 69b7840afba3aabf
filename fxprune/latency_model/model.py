"""`LatencyModel`: measured layer tables of one model on one device, and the end-to-end fit.

Data, as JSON (`to_json` / `from_json`):

- ``tables``: one per layer signature: the input-axis curve ``in`` = {x: channel counts, t:
  seconds} measured with the output full, the output-axis curve ``out`` measured with the input
  full (a 1-D layer has one of them), ``alpha`` (the separable model's constant part), ``diag``
  (the [i, o, seconds] corners measured off the axes that fixed alpha), ``interp`` ("linear" on
  the CPU's coarse grid, "ceil" on the GPU's tile grid) and ``stable``.
- ``layers``: per profiled node: its table and its axes (fixed positions; [group, n_units,
  positions per unit] per group; channels per unit of the main group).
- ``offset`` / ``scale``: predicted = offset + scale x (sum of the layers' times), least squares
  on the end-to-end measurements in ``fit``; ``original_s``: the full model measured.

`predict` reads every layer's curves at the axis coordinates of the kept counts (on the curves'
monotone envelopes, so a prediction never falls when a group keeps more), in one vectorised pass.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..errors import ArtifactError, ConfigError
from .layers import Axis, node_axes
from .steps import Curves, detect_steps, monotone_envelope, separable

FORMAT = "fxprune-latency-model"
VERSION = 1


@dataclass
class LatencyModel:
    """Predicted seconds per forward of a model on one device, by kept units per prunable group."""

    key: dict  # device name, torch version, dtype, batch, channels_last, compile, input shapes, model layout digest
    original_s: float  # measured end-to-end seconds of the unpruned model (same settings)
    offset: float
    scale: float  # end-to-end fit: predicted = offset + scale * sum(layer times)
    tables: list = field(default_factory=list, repr=False)
    layer_specs: list = field(default_factory=list, repr=False)
    n_units: dict = field(default_factory=dict, repr=False)  # {prunable group index: n_units}
    fit: dict = field(default_factory=dict, repr=False)
    profile: dict = field(default_factory=dict, repr=False)
    source: str = field(default="measured", compare=False)  # "measured" or "cache"

    def __post_init__(self):
        self._compile()

    # ------------------------------------------------------------------ prediction
    def _compile(self) -> None:
        self.n_units = {int(g): int(n) for g, n in self.n_units.items()}
        self._col = {g: j for j, g in enumerate(sorted(self.n_units))}
        self._full = np.asarray([self.n_units[g] for g in sorted(self.n_units)], dtype=np.float64)
        self._axes = [(None if d["in"] is None else Axis.from_json(d["in"]),
                       None if d["out"] is None else Axis.from_json(d["out"])) for d in self.layer_specs]
        n_layers, n_groups = len(self.layer_specs), len(self._col)
        curves, table_curve = [], []
        for tab in self.tables:
            ids = {}
            for side in ("in", "out"):
                if tab.get(side) is not None:
                    ids[side] = len(curves)
                    curves.append((np.asarray(tab[side]["x"], dtype=np.float64),
                                   monotone_envelope(tab[side]["t"]), tab.get("interp", "linear")))
            table_curve.append(ids)
        self._curves = Curves(curves)
        ends = [float(y[-1]) if len(y) else 0.0 for _, y, _ in curves]
        mats = {side: (np.zeros(n_layers), np.zeros((n_layers, n_groups))) for side in ("in", "out")}
        self._curve = {side: np.full(n_layers, -1, dtype=np.int64) for side in ("in", "out")}
        self._alpha, self._end_in, self._end_out = np.zeros(n_layers), np.zeros(n_layers), np.zeros(n_layers)
        for l, (spec, axes) in enumerate(zip(self.layer_specs, self._axes)):
            ids = table_curve[spec["table"]]
            for side, axis in zip(("in", "out"), axes):
                if axis is None:
                    continue
                fixed, mat = mats[side]
                fixed[l] = axis.fixed
                for g, _, p in axis.groups:
                    mat[l, self._col[g]] += p
                self._curve[side][l] = ids[side]
            self._alpha[l] = float(self.tables[spec["table"]].get("alpha", 0.0))
            self._end_in[l] = ends[ids["in"]] if "in" in ids else 0.0
            self._end_out[l] = ends[ids["out"]] if "out" in ids else 0.0
        self._mats = mats
        self._steps: dict[int, np.ndarray] = {}

    def _counts(self, kept: Mapping[int, int]) -> np.ndarray:
        k = self._full.copy()
        for g, v in kept.items():
            j = self._col.get(int(g))
            if j is None:
                raise ConfigError(f"group {g} is not a prunable group of this model (prunable: "
                                  f"{sorted(self._col)[:10]}{'...' if len(self._col) > 10 else ''})")
            if not 0 <= v <= self._full[j]:
                raise ConfigError(f"group {g} keeps {v} units, outside 0..{int(self._full[j])}")
            k[j] = float(v)
        return k

    def layer_times(self, kept: Mapping[int, int]) -> np.ndarray:
        """Seconds of every profiled layer (in `layers()` order), before the fit's offset and scale."""
        k = self._counts(kept)
        t = {}
        for side in ("in", "out"):
            fixed, mat = self._mats[side]
            ids = self._curve[side]
            has = ids >= 0
            values = np.zeros(len(ids))
            if has.any():
                values[has] = self._curves.evaluate(ids[has], (fixed + mat @ k)[has])
            t[side] = (values, has)
        (a, has_in), (b, has_out) = t["in"], t["out"]
        both = has_in & has_out
        out = np.where(has_in, a, b)
        if both.any():
            out[both] = separable(a[both], b[both], self._alpha[both], self._end_in[both], self._end_out[both])
        return out

    def _present(self, removed) -> np.ndarray | None:
        """1 for each layer whose node stays, 0 for those in `removed` (node names a plan's removed
        residual branches take along: `passes.plan.plan_removed_nodes`); None when nothing goes."""
        if not removed:
            return None
        return np.asarray([spec["node"] not in removed for spec in self.layer_specs], dtype=np.float64)

    def predict_rows(self, rows: np.ndarray, removed: frozenset = frozenset()) -> np.ndarray:
        """Predicted seconds for many kept-count vectors at once: `rows` is (T, prunable groups) in
        ascending group-index order (`group_order`), kept units per group; the layers of `removed`
        nodes count nothing. The selections try one move per group per step; evaluating them
        together is one vectorised pass instead of T."""
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        if rows.shape[1] != len(self._full):
            raise ConfigError(f"rows have {rows.shape[1]} columns; this model has {len(self._full)} prunable groups")
        n_layers, n_rows = len(self.layer_specs), rows.shape[0]
        t = {}
        for side in ("in", "out"):
            fixed, mat = self._mats[side]
            ids = self._curve[side]
            has = ids >= 0
            values = np.zeros((n_layers, n_rows))
            if has.any():
                x = fixed[has, None] + mat[has] @ rows.T
                values[has] = self._curves.evaluate(np.repeat(ids[has], n_rows), x.ravel()).reshape(x.shape)
            t[side] = (values, has)
        (a, has_in), (b, has_out) = t["in"], t["out"]
        both = has_in & has_out
        out = np.where(has_in[:, None], a, b)
        if both.any():
            col = lambda v: v[both][:, None]  # noqa: E731
            out[both] = separable(a[both], b[both], col(self._alpha), col(self._end_in), col(self._end_out))
        present = self._present(removed)
        if present is not None:
            out = out * present[:, None]
        return self.offset + self.scale * out.sum(axis=0)

    @property
    def group_order(self) -> list[int]:
        """The prunable group indices in the column order of `predict_rows`."""
        return sorted(self._col)

    def layer_sum(self, kept: Mapping[int, int], removed: frozenset = frozenset()) -> float:
        times, present = self.layer_times(kept), self._present(removed)
        return float(times.sum() if present is None else (times * present).sum())

    def predict(self, kept: Mapping[int, int], removed: frozenset = frozenset()) -> float:
        """Predicted seconds per forward for kept units per prunable group index (groups absent = full);
        the layers of the `removed` nodes (a plan's removed residual branches) count nothing."""
        return self.offset + self.scale * self.layer_sum(kept, removed)

    def group_steps(self, group: int) -> np.ndarray:
        """Ascending kept-unit counts of `group` that are lower edges of steps of the layers it touches
        (union over its layers, in units), always including the group's full n_units."""
        group = int(group)
        if group not in self.n_units:
            raise ConfigError(f"group {group} is not a prunable group of this model")
        if group not in self._steps:
            found = {self.n_units[group]}
            for spec, axes in zip(self.layer_specs, self._axes):
                tab = self.tables[spec["table"]]
                for side, axis in zip(("in", "out"), axes):
                    if axis is None or all(g != group for g, _, _ in axis.groups):
                        continue
                    for c in detect_steps(np.asarray(tab[side]["x"]), np.asarray(tab[side]["t"])):
                        found.add(axis.units(float(c), group))
            self._steps[group] = np.asarray(sorted(found), dtype=np.int64)
        return self._steps[group].copy()

    def layers(self) -> list[dict]:
        """Per profiled layer: node, op, groups, and its table (measured grid and times per axis)."""
        out = []
        for spec, axes in zip(self.layer_specs, self._axes):
            tab = self.tables[spec["table"]]
            row = {"node": spec["node"], "op": spec["op"], "signature": tab["signature"],
                   "groups": sorted({g for a in axes if a for g, _, _ in a.groups})}
            for side, axis in zip(("in", "out"), axes):
                row[side] = None if axis is None else {**axis.to_json(), **copy.deepcopy(tab[side])}
            row.update({k: copy.deepcopy(tab.get(k)) for k in ("alpha", "diag", "interp", "stable")})
            out.append(row)
        return out

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "key": copy.deepcopy(self.key),
                "original_s": self.original_s, "offset": self.offset, "scale": self.scale,
                "n_units": {str(g): n for g, n in sorted(self.n_units.items())},
                "tables": copy.deepcopy(self.tables), "layers": copy.deepcopy(self.layer_specs),
                "fit": copy.deepcopy(self.fit), "profile": copy.deepcopy(self.profile)}

    @classmethod
    def from_json(cls, data, channels) -> "LatencyModel":
        """The model saved by `to_json`, checked value by value and against `channels` (the
        analysis it is for: its prunable groups and each layer's axes). ArtifactError if not."""
        try:
            return _parse(cls, data, channels)
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, StopIteration) as exc:
            raise ArtifactError(f"latency model data is malformed: {type(exc).__name__}: {exc}") from exc


def _number(value, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArtifactError(f"latency model: {name} is not a finite number ({value!r})")
    if (positive and value <= 0) or (nonnegative and value < 0):
        raise ArtifactError(f"latency model: {name} = {value!r} is out of range")
    return float(value)


def _curve(data, name: str) -> dict:
    x = [_number(v, f"{name}.x") for v in data["x"]]
    t = [_number(v, f"{name}.t", nonnegative=True) for v in data["t"]]
    if not x or len(x) != len(t) or any(b <= a for a, b in itertools.pairwise(x)):
        raise ArtifactError(f"latency model: curve {name} is empty, ragged or not ascending")
    return {"x": x, "t": t}


def _parse(cls, data, channels) -> LatencyModel:
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ArtifactError(f"not a {FORMAT} version {VERSION} document")
    if not isinstance(data["key"], dict):
        raise ArtifactError("latency model: key is not an object")
    n_units = {int(g): int(n) for g, n in data["n_units"].items()}
    expected = {g.index: g.n_units for g in channels.prunable_groups}
    if n_units != expected:
        raise ArtifactError("latency model: its prunable groups are not this model's")
    tables = []
    for i, tab in enumerate(data["tables"]):
        clean = {"signature": str(tab["signature"]), "op": str(tab["op"]), "node": str(tab["node"]),
                 "in": None if tab["in"] is None else _curve(tab["in"], f"tables[{i}].in"),
                 "out": None if tab["out"] is None else _curve(tab["out"], f"tables[{i}].out"),
                 "alpha": _number(tab["alpha"], f"tables[{i}].alpha"),
                 "diag": [[_number(v, f"tables[{i}].diag") for v in row] for row in tab["diag"]],
                 "interp": tab["interp"], "stable": bool(tab["stable"]), "calls": int(tab.get("calls", 0))}
        if clean["interp"] not in ("linear", "ceil") or (clean["in"] is None and clean["out"] is None):
            raise ArtifactError(f"latency model: tables[{i}] has no curve or an unknown interpolation")
        if any(len(row) != 3 for row in clean["diag"]):
            raise ArtifactError(f"latency model: tables[{i}].diag rows are not [i, o, seconds]")
        tables.append(clean)
    nodes = {n.name: n for n in channels.gm.graph.nodes}
    specs = []
    for i, spec in enumerate(data["layers"]):
        name, table = str(spec["node"]), int(spec["table"])
        if name not in nodes or not 0 <= table < len(tables):
            raise ArtifactError(f"latency model: layers[{i}] names node {name!r} or table {table} this model lacks")
        axes = node_axes(channels, nodes[name])
        for side, axis in zip(("in", "out"), axes):
            stored = None if spec[side] is None else Axis.from_json(spec[side])
            if (stored is None) != (axis is None) or (axis is not None and stored.shape_key() != axis.shape_key()
                                                      or axis is not None and [g for g, _, _ in stored.groups]
                                                      != [g for g, _, _ in axis.groups]):
                raise ArtifactError(f"latency model: the {side} axis of node {name!r} does not fit this model")
            if axis is not None and tables[table][side] is None:
                raise ArtifactError(f"latency model: table {table} has no {side} curve for node {name!r}")
        specs.append({"node": name, "op": str(spec["op"]), "table": table,
                      "in": None if axes[0] is None else axes[0].to_json(),
                      "out": None if axes[1] is None else axes[1].to_json()})
    fit, profile = data.get("fit", {}), data.get("profile", {})
    if not isinstance(fit, dict) or not isinstance(profile, dict):
        raise ArtifactError("latency model: fit / profile are not objects")
    return cls(key=dict(data["key"]), original_s=_number(data["original_s"], "original_s", positive=True),
               offset=_number(data["offset"], "offset"), scale=_number(data["scale"], "scale", positive=True),
               tables=tables, layer_specs=specs, n_units=n_units, fit=copy.deepcopy(fit),
               profile=copy.deepcopy(profile), source="cache")


__all__ = ["FORMAT", "VERSION", "LatencyModel"]
