"""scripts/bench.py --packed: the packed-sweep benchmark runs and reports each figure (not timed here).

As tests/test_speed_paths.py runs the default bench (--quick), this runs ``--packed`` on the tiny
data set: K seeds as one pack in each form (fused, in turn, auto) against the same K runs and K bare loops.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import ROOT, tiny_overrides

from alexnet_lab.packing import FORMS, FUSED_AT_LEAST

K = 2


def test_the_packed_benchmark_runs_and_reports_each_figure(tmp_path):
    overrides = [item for item in tiny_overrides(tmp_path) if not item.startswith("trainer.max_epochs")]
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--packed", str(K), "--quick", "--json"]
    done = subprocess.run(
        [*command, "--out", str(out), "--downscales", "16", "--", *overrides, "trainer.max_epochs=2"],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert found == json.loads(out.read_text())
    assert found["packed"] == K and found["quick"] is True and found["data"]["image_size"] == 64
    keys = ["packed_vs_bare", "packed_vs_unpacked", "auto_vs_unpacked"]
    keys += [f"{form}_vs_bare" for form in FORMS] + ["fused_vs_in_turn", "auto_vs_in_turn"]
    for key in keys:
        assert list(found[key]) == ["d16"]
        value, (low, high) = found[key]["d16"], found[f"{key}_spread"]["d16"]
        assert all(math.isfinite(x) and x > 0 for x in (value, low, high)), (key, value, low, high)
        assert low <= value <= high, "the median of the rounds lies within their range"
    assert all(rate > 0 for rate in found["images_per_s"]["d16"].values())
    assert set(found["images_per_s"]["d16"]) == {*FORMS, "unpacked", "bare"}
    assert found["packed_vs_bare"] == found["auto_vs_bare"], "the default form's figures under issue 23's names"
    ((chose,),) = found["auto_chose"].values()  # one round: auto timed the forms once and trained the faster
    assert chose["form"] == ("fused" if chose["form_ratio"] >= FUSED_AT_LEAST else "in_turn")
    # the pack trained K members: K run dirs with an ok metrics.json, K runs' images in each of its epochs
    assert found["packed_runs_ok"]["d16"] == K
    member = found["member_images_per_epoch"]["d16"]
    assert member > 0 and found["packed_images_per_epoch"]["d16"] == K * member
    # two epochs per run, the first a warm-up: one measured epoch per pack, per run and per bare loop
    epochs = {side: len(seconds) for side, seconds in found["epoch_s"]["d16"].items()}
    assert epochs == {"auto": 1, "fused": 1, "in_turn": 1, "unpacked": K, "bare": K}
    assert "fused / bare" in done.stderr, "the table goes to stderr with --json"
    assert "lightning_vs_bare" not in found, "--packed measures packed sweeps only"
