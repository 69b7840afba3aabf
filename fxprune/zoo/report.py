"""The zoo report: `report.json` (every number) and `report.md` (the table people read)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from ..artifacts import atomic_write
from ..export import CHECKS
from ..report import human

HEADERS = ["model", "task", "status", "groups (prunable/all)", "boundaries (main reason)", "params", "MACs",
           "FLOPs (2×MACs)", "max rel. error", "CPU latency b=1 (ms)", "convert s", *CHECKS, "error"]


def _mark(value: str | None) -> str:
    if value is None:
        return ""
    return "yes" if value == "ok" else ("skipped" if value.startswith("skipped") else "no")


def _arrow(a, b, fmt=human) -> str:
    return f"{fmt(a)} → {fmt(b)}"


def table_row(row: dict) -> list:
    r = row.get("report")
    if row["status"] != "ok" or r is None:
        return [row["model"], row["task"], row["status"], "", "", "", "", "", "", "", "", "", "", "",
                row.get("error", "")]
    reasons = Counter(reason.split(":")[0] for _, reason in r["boundaries"])
    main = f" ({reasons.most_common(1)[0][0]})" if reasons else ""
    lat = row.get("latency_ms")
    exports = row.get("exports", {})
    return [row["model"], row["task"], "ok", f"{r['prunable_groups']}/{r['groups']}", f"{len(r['boundaries'])}{main}",
            _arrow(r["params_before"], r["params_after"]), _arrow(r["macs_before"], r["macs_after"]),
            _arrow(r["flops_before"], r["flops_after"]), f"{r['max_rel_error']:.1e}" if r["max_rel_error"] is not None
            else "not verified", _arrow(*lat, fmt=lambda v: f"{v:.2f}") if lat else "",
            f"{row.get('convert_s', 0):.1f}", *[_mark(exports.get(c)) for c in CHECKS], ""]


def markdown(rows: list[dict]) -> str:
    return tabulate([table_row(r) for r in rows], headers=HEADERS, tablefmt="github", disable_numparse=True)


def collect(out: Path, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        file = out / "results" / f"{name}.json"
        if file.exists():
            rows.append(json.loads(file.read_text()))
    return rows


def write_report(out: Path, names: list[str], header: str = "") -> list[dict]:
    rows = collect(out, names)
    atomic_write(out / "report.json", json.dumps(rows, indent=1).encode())
    ok = sum(r["status"] == "ok" for r in rows)
    text = (f"{header}{ok}/{len(rows)} converted ({len(names) - len(rows)} not run yet). "
            "MACs and FLOPs (= 2 × MACs) counted on the emitted graphs; error = max relative difference "
            "to the masked original; latency = median at batch 1 on this CPU.\n\n" + markdown(rows) + "\n")
    atomic_write(out / "report.md", text.encode())
    return rows
