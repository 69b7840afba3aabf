"""Human-readable tables (tabulate). MACs and FLOPs (= 2 x MACs) always in separate columns."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tabulate import tabulate


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def groups_table(analysis, limit: int | None = None) -> str:
    rows = []
    for g in analysis.groups[:limit]:
        lead = g.leading
        members = ", ".join(f"{m.target}[{m.dim}]" for m in g.members[:4])
        if len(g.members) > 4:
            members += f", +{len(g.members) - 4} more"
        rows.append([g.index, g.size, g.n_units, "yes" if g.prunable else "no",
                     f"{lead.target}[{lead.dim}]", members, g.reason or ""])
    return tabulate(rows, headers=["group", "channels", "units", "prunable", "leading member",
                                   "members", "why not prunable"], tablefmt="github")


def boundaries_table(analysis) -> str:
    rows = [[b.node, b.reason] for b in analysis.boundaries]
    return tabulate(rows, headers=["boundary node", "reason"], tablefmt="github") if rows else "no boundary ops"


def main_boundary_reason(analysis) -> str:
    reasons = Counter(g.reason for g in analysis.groups if not g.prunable)
    return reasons.most_common(1)[0][0] if reasons else ""


@dataclass
class CompressionReport:
    """What `compress` did, with before/after counts and timings (seconds)."""

    model: str
    method: str
    target_flops: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    max_abs_error: float | None
    max_rel_error: float | None
    groups: int
    prunable_groups: int
    boundaries: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # method-specific: removed blocks, search history...

    @property
    def flops_before(self) -> int:
        return 2 * self.macs_before

    @property
    def flops_after(self) -> int:
        return 2 * self.macs_after

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def table(self) -> str:
        err = "not verified" if self.max_abs_error is None else f"{self.max_abs_error:.2e} (rel {self.max_rel_error:.1e})"
        rows = [
            ["params", human(self.params_before), human(self.params_after),
             f"{self.params_after / max(self.params_before, 1):.3f}"],
            ["MACs", human(self.macs_before), human(self.macs_after), f"{self.macs_ratio:.3f}"],
            ["FLOPs (2xMACs)", human(self.flops_before), human(self.flops_after), f"{self.macs_ratio:.3f}"],
        ]
        lat = self.details.get("latency") if isinstance(self.details, dict) else None
        if isinstance(lat, dict) and lat.get("measured_after_s") is not None:
            for kind in ("predicted", "measured"):
                a, b = lat.get(f"{kind}_before_s"), lat.get(f"{kind}_after_s")
                if a and b:
                    rows.append([f"latency {kind} (ms, {lat.get('on', '')})", f"{a * 1e3:.3f}", f"{b * 1e3:.3f}",
                                 f"{b / a:.3f}"])
        head = tabulate(rows, headers=["", "before", "after", "ratio"], tablefmt="github")
        timing = ", ".join(f"{k} {v:.3f}s" for k, v in self.timings.items())
        return (f"{head}\n\nmethod {self.method}, target flops {self.target_flops}, "
                f"{self.prunable_groups}/{self.groups} groups prunable, {len(self.boundaries)} boundary ops\n"
                f"max error vs masked original: {err}\ntime: {timing}")

    def summary(self) -> dict:
        """The numbers as plain JSON (for recipes and batch reports)."""
        return {
            "model": self.model, "method": self.method, "target_flops": self.target_flops,
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "flops_before": self.flops_before, "flops_after": self.flops_after,
            "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "groups": self.groups, "prunable_groups": self.prunable_groups,
            "boundaries": [[b.node, b.reason] for b in self.boundaries], "timings": dict(self.timings),
            "details": self.details,  # methods keep it JSON-plain (numbers, strings, lists, dicts)
        }

    def __str__(self) -> str:
        return self.table()
