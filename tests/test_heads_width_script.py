"""benches/experiments/heads_width.py: whole heads and per-head widths at half the MACs, with the share
of the cut the head groups made. One small run (swin_t at 64x64, one thread): every `heads` value
reaches 0.5 of the MACs verified, "width" and "auto" prune q/k and v position groups (two per attention
pruned, more groups than whole heads), the head groups make part of the cut, and the Markdown holds
every row. No timing is asserted."""
from __future__ import annotations

import json

import torch

from benches.experiments import heads_width


def test_heads_width_script_on_swin_t(tmp_path):
    before = torch.get_num_threads()
    try:
        rc = heads_width.main(["--models", "swin_t", "--size", "64", "--json", str(tmp_path / "r.json"),
                               "--md", str(tmp_path / "r.md")])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    rows = {r["heads"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert set(rows) == {"whole", "width", "auto"}
    for r in rows.values():
        assert 0.49 <= r["macs_fraction"] <= 0.5 and 0 <= r["max_rel_error"] < 1e-4 and r["params_fraction"] < 1
        assert 0 < r["share_heads_pct"] <= 100
    assert rows["width"]["head_groups_pruned"] > rows["whole"]["head_groups_pruned"]
    assert rows["auto"]["head_groups_pruned"] == rows["width"]["head_groups_pruned"]  # Swin-T heads are wide
    md = (tmp_path / "r.md").read_text()
    assert md.count("| swin_t |") == 3
