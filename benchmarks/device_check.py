"""The GPU check: everything this project runs on CUDA, as users run it, in one script of a few minutes.

Made for a bare GPU machine without network (the H200 of docs/benchmarks.md "On an H200"): it installs
the wheels that machine lacks (``bash benchmarks/device_wheels.sh`` fills ``.whl/`` here) into a folder
it puts on ``PYTHONPATH``, checks the installed versions against pyproject.toml, then runs, each step in
its own process and time limit, a failed step recorded with its error without stopping the others:

1. ``cuda_tests``: ``pytest -m cuda`` over the modules that mark tests ``cuda`` (every reducer and mode on
   CUDA against the CPU, FLOPs, dynamic packing, soft-mode gradients, width cuts, CUDA graphs);
2. ``search_run``: ``search run --flops 0.35 --device cuda`` on the embedded default, bf16 (the default
   on CUDA), and in fp32 (``--no-amp``) when time is left: seconds per trial, best select top-1;
3. ``same_plan``: the best plan validated on the CPU, on CUDA in fp32 and in bf16: FLOPs ratio,
   tokens kept and top-1 on the test split;
4. ``bench``: ``search bench`` for DeiT-S and DeiT-B (random weights, bf16) at batch 1, 64 and 256,
   static and dynamic, then compiled (``reduce-overhead``) at batch 1 (and 256 when time is left);
5. ``train``: ``search train --recipe full --epochs 1`` on CUDA with bf16 (images/s), then the same run
   killed after its first checkpoint and resumed (the weights against the uninterrupted run's, and,
   when they differ, against a second uninterrupted run's);
6. ``kernels``: ``benchmarks/kernel_count.py``: kernels launched, device busy time and wall time of one
   eager forward, DeiT-S at batch 1 and DeiT-B at 256 (is eager mode bound by launches?).

Rows go to ``OUT/rows.jsonl`` (one JSON object per line; ``step``, ``ok``, ``seconds``, ``error`` and
the figures), the pytest report to ``OUT/cuda_tests.xml``, every step's output to ``OUT/log.txt``; the
last row (``step: targets``) holds the issue's targets against what was measured.

``--dry-run`` runs each kind of step once on the CPU at tiny sizes (CI runs it, so the script cannot
rot); the CUDA tests are then collected and skipped.

    python benchmarks/device_check.py --out DIR [--wheels .whl] [--budget-s 460] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


class Check:
    """Rows, the log, the work folder and the wall-clock budget of one run of the check."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool, env: dict[str, str]) -> None:
        self.out, self.dry_run, self.env = out, dry_run, env
        self.work = Path(os.environ.get("TMPDIR", "/tmp")) / f"ltmp-device-check-{os.getpid()}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget_s
        self.rows: list[dict[str, Any]] = []
        self.log = (out / "log.txt").open("a", encoding="utf-8")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, step: str, **values: Any) -> dict[str, Any]:
        row = {"step": step, **values}
        self.rows.append(row)
        with (self.out / "rows.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
        flag = "ok" if row.get("ok", True) else "FAILED"
        print(f"[{self.left():6.0f}s left] {step}: {flag} {_short(row)}", flush=True)
        return row

    def run(self, step: str, args: list[str], timeout: float, *, env: dict[str, str] | None = None) -> str:
        """Run a command of this step; its stdout (raises with the output's tail when it fails)."""
        timeout = min(timeout, self.left())
        if timeout < 5:
            raise TimeoutError(f"no time left for: {shlex.join(args)}")
        self.log.write(f"\n=== {step}: {shlex.join(args)}\n")
        self.log.flush()
        start = time.monotonic()
        try:
            done = subprocess.run(args, cwd=self.work, env={**self.env, **(env or {})}, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.log.write(_text(e.stdout) + _text(e.stderr))
            raise TimeoutError(f"{shlex.join(args[2:5])}... ran past {timeout:.0f} s") from None
        self.log.write(done.stdout[-20000:] + done.stderr[-20000:] + f"\n=== rc {done.returncode} in "
                       f"{time.monotonic() - start:.1f} s\n")
        self.log.flush()
        if done.returncode != 0:
            raise RuntimeError(f"exit code {done.returncode}: {(done.stderr or done.stdout).strip()[-600:]}")
        return done.stdout

    def search(self, step: str, *args: str, timeout: float = 300) -> Any:
        """``search ARGS --json``, as the user runs it; the parsed JSON."""
        return json.loads(self.run(step, [sys.executable, "-m", "search", *args, "--json"], timeout))

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None], *, needs: float = 10) -> dict[str, Any]:
        """Run one step; a failure becomes a row with its error, and the check goes on."""
        if self.left() < needs:
            return self.row(name, ok=False, skipped=True, error=f"skipped: {self.left():.0f} s left, needs {needs:.0f}")
        start = time.monotonic()
        try:
            values = fn() or {}
            return self.row(name, ok=bool(values.pop("ok", True)), seconds=round(time.monotonic() - start, 1),
                            **values)
        except Exception as e:  # noqa: BLE001  (every failure is a row; the other steps still run)
            self.log.write(traceback.format_exc())
            return self.row(name, ok=False, seconds=round(time.monotonic() - start, 1),
                            error=f"{type(e).__name__}: {e}"[-1500:])


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else (v or "")


def _short(row: dict[str, Any]) -> str:
    keep = {k: v for k, v in row.items() if k not in ("step", "ok") and not isinstance(v, (list, dict))}
    return json.dumps(keep, default=str)[:300]


# --- setup ---------------------------------------------------------------------------------------------


def install_wheels(wheels: Path, site: Path) -> list[str]:
    """Install every wheel of ``wheels`` into ``site`` (no index, no dependencies); their names."""
    found = sorted(str(p) for p in wheels.glob("*.whl"))
    if not found:
        return []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *found], check=True)
    return [Path(p).name.split("-")[0] for p in found]


def check_versions() -> dict[str, Any]:
    """Every dependency of pyproject.toml installed at a version it allows (torch 2.11 included)."""
    import importlib.metadata as md

    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    versions, problems = {}, []
    for spec in project["dependencies"]:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (needs {req.specifier or 'any version'})")
            continue
        versions[req.name] = version
        if version not in req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} is outside {req.specifier}")
    import torch

    versions["python"] = sys.version.split()[0]
    versions["cuda"] = torch.version.cuda
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"ok": not problems, "versions": versions, "problems": problems, "gpu": gpu}


# --- steps ---------------------------------------------------------------------------------------------


def cuda_test_files() -> list[str]:
    """The test modules that mark any test ``cuda`` (collecting only them spares importing the whole suite;
    the whole folder when none is found, so a renamed marker still shows up as no CUDA test run)."""
    marked = sorted(str(p) for p in (ROOT / "tests").rglob("test_*.py")
                    if "mark.cuda" in p.read_text(encoding="utf-8"))
    return marked or [str(ROOT / "tests")]


def cuda_tests(c: Check) -> dict[str, Any]:
    report = c.out / "cuda_tests.xml"
    try:
        c.run("cuda_tests", [sys.executable, "-m", "pytest", *cuda_test_files(), "-m", "cuda", "-q", "-p",
                             "no:cacheprovider", f"--junitxml={report}", "--rootdir", str(ROOT)],
              timeout=150, env={"LTMP_TEST_DEVICE": "cuda"})
        failed = None
    except RuntimeError as e:
        failed = str(e)
    cases = ET.parse(report).getroot().iter("testcase") if report.exists() else []
    outcome: dict[str, int] = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in cases:
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            outcome["failed"] += 1
            failures.append({"test": case.get("name"), "message": (bad.get("message") or "")[:400]})
        elif case.find("skipped") is not None:
            outcome["skipped"] += 1
        else:
            outcome["passed"] += 1
    ok = failed is None and outcome["failed"] == 0 and (c.dry_run or outcome["skipped"] == 0)
    return {"ok": ok, **outcome, "failures": failures, **({"error": failed} if failed and not failures else {})}


def search_run(c: Check, name: str, *extra: str) -> dict[str, Any]:
    device = ["--device", "cpu", "--n-trials", "2"] if c.dry_run else ["--device", "cuda"]
    storage = f"sqlite:///{c.work / 'search.db'}"
    start = time.monotonic()
    run = c.search("search_run", "run", "--flops", "0.35", *device, *extra, "--storage", storage,
                   "--study-name", name, "--quiet", timeout=300)
    wall = time.monotonic() - start
    shown = c.search("search_run", "show", name, "--storage", storage)
    trials = shown["trials"]
    durations = sorted(t["duration_s"] for t in trials if t.get("duration_s") is not None)
    complete = [t for t in trials if t["state"] == "complete"]
    best = run["best"] or {}
    if best:
        c.search("search_run", "export", name, "--storage", storage, "-o", str(c.work / f"{name}.json"))
    return {
        "study": name, "amp": "--no-amp" not in extra, "trials": len(trials), "complete": len(complete),
        "wall_s": round(wall, 1), "s_per_trial_mean": sum(durations) / max(1, len(durations)),
        "s_per_trial_median": durations[len(durations) // 2] if durations else None,
        "s_per_complete_trial": sum(t["duration_s"] for t in complete) / max(1, len(complete)),
        "best_top1_select": best.get("top1"), "best_flops_ratio": best.get("flops_ratio"),
        "best_trial": best.get("number"), "base_top1_select": run["base"].get("evaluated_accuracy"),
    }


def same_plan(c: Check, study: str) -> dict[str, Any]:
    plan = c.work / f"{study}.json"
    if not plan.exists():
        raise FileNotFoundError(f"{plan.name}: the search step exported no plan")
    runs = {"cpu": ["--device", "cpu"]}
    if not c.dry_run:
        runs.update({"cuda_fp32": ["--device", "cuda", "--no-amp"], "cuda_bf16": ["--device", "cuda", "--amp"]})
    got = {}
    for key, flags in runs.items():
        v = c.search("same_plan", "validate", str(plan), *flags, timeout=180)
        got[key] = {"top1": v["top1"], "flops_ratio": v["flops_ratio"], "kept_tokens": v["kept_tokens"],
                    "images_per_s": v["images_per_s"]}
    row: dict[str, Any] = {"plan": plan.name, **got}
    if "cuda_fp32" in got:
        cpu, fp32, bf16 = got["cpu"], got["cuda_fp32"], got["cuda_bf16"]
        row["fp32_tokens_equal"] = all(abs(a - b) < 1e-9 for a, b in zip(cpu["kept_tokens"], fp32["kept_tokens"]))
        row["fp32_top1_diff_points"] = 100 * (fp32["top1"] - cpu["top1"])
        row["bf16_top1_diff_points"] = 100 * (bf16["top1"] - cpu["top1"])
        row["bf16_flops_ratio_diff"] = bf16["flops_ratio"] - cpu["flops_ratio"]
        row["ok"] = row["fp32_tokens_equal"] and abs(row["bf16_top1_diff_points"]) <= 0.2
    return row


TINY_VIT = ["--model-kwargs", "img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3"]


def bench(c: Check, model: str, batches: str, *extra: str) -> dict[str, Any]:
    if c.dry_run:
        args = ["bench", "--model", "deit_tiny_patch16_224", *TINY_VIT, "--flops", "0.5", "-b", "1,2",
                "--device", "cpu", "--runs", "2", "--warmup", "1", *[e for e in extra if e != "--compile"]]
    else:
        args = ["bench", "--model", model, "--flops", "0.35", "--importance", "cls", "-b", batches, "--device", "cuda",
                "--amp", "--runs", "20", "--warmup", "5", *extra]
    printed = c.run("bench", [sys.executable, "-m", "search", *args, "--storage", f"sqlite:///{c.work / 'bench.db'}",
                              "--json"], timeout=300)
    rows = [json.loads(line) for line in printed.splitlines() if line.strip()]  # one object per configuration
    keys = ("batch", "mode", "compiled", "flops_ratio", "images_per_s_base", "images_per_s_plan", "latency_ms_base",
            "latency_ms_plan", "speedup", "ideal_fraction", "peak_memory_mb", "activation_mb_base",
            "activation_mb_plan")
    return {"model": model, "rows": [{k: r.get(k) for k in keys} for r in rows]}


def train(c: Check, study: str) -> dict[str, Any]:
    plan = c.work / f"{study}.json"
    if not plan.exists():
        raise FileNotFoundError(f"{plan.name}: the search step exported no plan")
    quick = ["--train-images", "120", "-b", "40", "--device", "cpu"] if c.dry_run else ["-b", "128", "--device", "cuda"]
    cmd = [sys.executable, "-m", "search", "train", str(plan), "--recipe", "full", "--epochs", "1", *quick,
           "--save-every", "1" if c.dry_run else "2", "--quiet", "--json"]
    whole = json.loads(c.run("train", [*cmd, "-o", str(c.work / "whole")], timeout=240))
    seconds = whole["history"][-1]["seconds"]
    batch = 40 if c.dry_run else 128
    row = {"steps": whole["steps"], "train_seconds": seconds, "images_per_s": whole["steps"] * batch / seconds,
           "select_top1": whole.get("select_top1"), "test_top1": whole.get("test_top1"),
           "test_flops_ratio": whole.get("test_flops_ratio")}
    # Killed after its first checkpoint, then resumed: the run ends where the uninterrupted one did.
    cut = c.work / "cut"
    proc = subprocess.Popen([*cmd, "-o", str(cut)], cwd=c.work, env=c.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    limit = time.monotonic() + min(120, c.left())
    while not (cut / "last.pth").exists() and proc.poll() is None and time.monotonic() < limit:
        time.sleep(0.002)
    if proc.poll() is not None:
        raise RuntimeError("the run to interrupt ended before its first checkpoint")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = json.loads(c.run("train", [*cmd, "-o", str(cut), "--resume"], timeout=240))
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(c.work / "whole" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    row.update({"resumed_at": resumed["resumed_at"], "resume_max_weight_diff": diff,
                "resume_bitwise_equal": all(torch.equal(a[k], b[k]) for k in a)})
    if not row["resume_bitwise_equal"]:
        # The yardstick: the same uninterrupted run again (CUDA's atomic-add kernels do not add in a fixed order).
        c.run("train", [*cmd, "-o", str(c.work / "again")], timeout=240)
        again = load_file(str(c.work / "again" / "model.safetensors"))
        row["repeat_max_weight_diff"] = max(float((a[k].float() - again[k].float()).abs().max()) for k in a)
    row["ok"] = 0 < (resumed["resumed_at"] or 0) < whole["steps"] and diff < 1e-2
    return row


def kernels(c: Check, model: str, batch: int) -> dict[str, Any]:
    """benchmarks/kernel_count.py: kernels launched, device busy time and wall time of one eager forward."""
    args = ["--model", "deit_tiny_patch16_224", "--flops", "0.5", "-b", "1", "--device", "cpu", "--runs", "2"] \
        if c.dry_run else ["--model", model, "-b", str(batch), "--device", "cuda"]
    return json.loads(c.run("kernels", [sys.executable, str(ROOT / "benchmarks" / "kernel_count.py"), *args, "--json"],
                            timeout=120).strip().splitlines()[-1])


def targets(c: Check) -> dict[str, Any]:
    """The issue's targets against what this run measured (None: not measured)."""
    def bench_row(model: str, batch: int, mode: str, compiled: bool) -> dict[str, Any] | None:
        for r in c.rows:
            if r["step"] == "bench" and r.get("model") == model:
                for b in r.get("rows", []):
                    if b["batch"] == batch and b["mode"] == mode and bool(b["compiled"]) == compiled:
                        return b
        return None

    def first(step: str, **match: Any) -> dict[str, Any]:
        return next((r for r in c.rows if r["step"] == step and all(r.get(k) == v for k, v in match.items())), {})

    b_static = bench_row("deit_base_patch16_224", 256, "static", False) or {}
    b_dynamic = bench_row("deit_base_patch16_224", 256, "dynamic", False) or {}
    b_compiled = bench_row("deit_base_patch16_224", 256, "static", True) or {}
    b_1 = bench_row("deit_base_patch16_224", 1, "static", True) or {}
    s_1 = bench_row("deit_small_patch16_224", 1, "static", True) or {}
    run = first("search_run", amp=True)
    same = first("same_plan")
    tests = first("cuda_tests")
    return {
        "cuda_tests_all_pass": tests.get("ok"),
        "fp32_tokens_equal": same.get("fp32_tokens_equal"),
        "bf16_top1_within_0.2": None if "bf16_top1_diff_points" not in same else abs(same["bf16_top1_diff_points"]) <= 0.2,
        "deit_b_static_256_ideal_fraction": b_static.get("ideal_fraction"),
        "deit_b_static_256_compiled_ideal_fraction": b_compiled.get("ideal_fraction"),
        "deit_b_dynamic_over_static_256": (b_dynamic["images_per_s_plan"] / b_static["images_per_s_plan"]
                                           if b_static and b_dynamic else None),
        "deit_b_compiled_batch1_speedup": b_1.get("speedup"),
        "deit_s_compiled_batch1_speedup": s_1.get("speedup"),
        "search_s_per_trial": run.get("s_per_trial_mean"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for rows.jsonl, cuda_tests.xml and log.txt")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="wheels to install first (default: .whl/)")
    p.add_argument("--site", default=None, help="where to install them (default: a folder under TMPDIR)")
    p.add_argument("--budget-s", type=float, default=460, help="wall-clock seconds for the whole check (default 460)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    p.add_argument("--only", help="run these steps alone (comma-separated: cuda_tests, search_run, same_plan, bench, "
                   "train, kernels)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    site = Path(args.site or Path(os.environ.get("TMPDIR", "/tmp")) / "ltmp-device-site")
    installed = install_wheels(Path(args.wheels), site) if not args.dry_run else []
    path = [str(site)] if installed else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    sys.path[:0] = [*path, str(ROOT)]
    c = Check(out, args.budget_s, args.dry_run, env)
    env["LTMP_CACHE"] = str(c.work / "cache")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""

    c.row("start", dry_run=args.dry_run, wheels=installed, budget_s=args.budget_s, argv=sys.argv)
    versions = c.step("versions", check_versions, needs=0)
    if not args.dry_run and not versions.get("gpu"):
        c.row("gpu", ok=False, error="torch sees no CUDA device; the CUDA steps would measure the CPU")
        return 1
    # In order of what matters most if time runs short; --only picks some.
    steps: list[tuple[str, Callable[[], dict[str, Any] | None], float]] = [
        ("cuda_tests", lambda: cuda_tests(c), 30),
        ("search_run", lambda: search_run(c, "gpu-bf16"), 40),
        ("same_plan", lambda: same_plan(c, "gpu-bf16"), 30),
        ("train", lambda: train(c, "gpu-bf16"), 45),
        *[("bench", lambda m=m, b=b: bench(c, m, b, "--mode", "static", "--compile"), 60)
          for m, b in (("deit_base_patch16_224", "256"), ("deit_base_patch16_224", "1"), ("deit_small_patch16_224", "1"))],
        *[("kernels", lambda m=m, b=b: kernels(c, m, b), 20)
          for m, b in (("deit_small_patch16_224", 1), ("deit_base_patch16_224", 256))],
        *[("bench", lambda m=m: bench(c, m, "1,64,256", "--mode", "static,dynamic"), 30)
          for m in ("deit_small_patch16_224", "deit_base_patch16_224")],
        ("search_run", lambda: search_run(c, "gpu-fp32", "--no-amp"), 40),
    ]
    only = set(args.only.split(",")) if args.only else None
    done: set[str] = set()
    for name, fn, needs in steps:
        if (only is None or name in only) and not (args.dry_run and name in done):  # a dry run: each kind once
            c.step(name, fn, needs=needs)
            done.add(name)
    c.row("targets", **targets(c))
    failed = [r["step"] for r in c.rows if r.get("ok") is False]
    c.row("end", failed=failed, seconds_left=round(c.left()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
