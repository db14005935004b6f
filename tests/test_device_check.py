"""The GPU check's dry run: every kind of step of benchmarks/device_check.py on the CPU at tiny sizes,
so that the script a rare GPU lease depends on cannot rot between leases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_step_and_reports_each(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=400)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r.get("ok") is False]
    assert done.returncode == 0 and not failed, (failed, done.stdout[-2000:], done.stderr[-2000:])
    steps = [r["step"] for r in rows]
    for step in ("versions", "cuda_tests", "search_run", "same_plan", "train", "bench", "kernels", "targets", "end"):
        assert step in steps, f"no {step} row"
    by_step = {r["step"]: r for r in rows}
    assert by_step["cuda_tests"]["skipped"] > 0 and by_step["cuda_tests"]["failed"] == 0, "the CUDA tests were collected"
    assert 0 < by_step["train"]["resumed_at"] < by_step["train"]["steps"] and by_step["train"]["resume_bitwise_equal"]
    assert by_step["search_run"]["best_top1_select"] > 0.5
    assert all(r["speedup"] > 0 for r in by_step["bench"]["rows"])
    assert (out / "log.txt").stat().st_size > 0
