"""Many workers on one server study: connections, rows and throughput, measured (docs/scale.md).

    python benchmarks/scale_workers.py --url postgresql://postgres@127.0.0.1:5432/test --jobs 1,8 \
        [--n-trials 16] [--preset mnist] [--json]

For each ``--jobs N``: a new study of ``--n-trials`` trials of the preset (the embedded default:
shipped weights, nothing to train) in a scratch schema-free database made for the run (PostgreSQL:
``CREATE DATABASE``; dropped afterwards), run by ``search run --jobs N`` in a child process. While it
runs, the server's connections to that database are sampled every 0.2 s (``pg_stat_activity``).
Afterwards: wall time, trials per minute, finished trials (exactly ``--n-trials`` expected), rows
in every table, and the peak connections in all and per worker process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import sqlalchemy as sa


def _scratch(url: str) -> tuple[str, str]:
    """A fresh database on the server of ``url``; its URL and name."""
    name = f"ltmp_scale_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return str(sa.make_url(url).set(database=name)), name


def _drop(url: str, name: str) -> None:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _sample(url: str, name: str, stop: threading.Event, peaks: dict) -> None:
    """Peak connections to database ``name``, and per client process (one per worker or parent)."""
    engine = sa.create_engine(url)
    q = sa.text("SELECT count(*), count(DISTINCT client_port) FROM pg_stat_activity WHERE datname = :d")
    with engine.connect() as c:
        while not stop.is_set():
            total, _ = c.execute(q, {"d": name}).one()
            peaks["connections"] = max(peaks.get("connections", 0), total)
            c.commit()
            time.sleep(0.2)
    engine.dispose()


def _rows(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    tables = sa.inspect(engine).get_table_names()
    with engine.connect() as c:
        counts = {t: c.execute(sa.text(f'SELECT count(*) FROM "{t}"')).scalar_one() for t in sorted(tables)}
    engine.dispose()
    return counts


def measure(url: str, jobs: int, n_trials: int, preset: str) -> dict:
    db_url, name = _scratch(url)
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=_sample, args=(url, name, stop, peaks), daemon=True)
    sampler.start()
    cmd = [sys.executable, "-m", "search", "run", "--preset", preset, "--flops", "0.35", "--n-trials", str(n_trials),
           "--jobs", str(jobs), "--storage", db_url, "--study-name", f"scale-{jobs}", "--json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    row = {"jobs": jobs, "n_trials": n_trials, "exit_code": done.returncode, "seconds": round(seconds, 1),
           "trials_per_minute": round(60 * n_trials / seconds, 2), "peak_connections": peaks.get("connections"),
           "peak_connections_per_process": round(peaks.get("connections", 0) / (jobs + (1 if jobs > 1 else 0)), 2)}
    try:
        rows = _rows(db_url)
        row["rows"] = rows
        import optuna

        study = optuna.load_study(study_name=f"scale-{jobs}", storage=db_url)
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        row["trial_states"] = {s: states.count(s) for s in sorted(set(states))}
        row["rows_per_trial"] = round(sum(rows.values()) / max(1, len(states)), 1)
    finally:
        _drop(url, name)
    if done.returncode:
        row["stderr_tail"] = done.stderr[-400:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("LTMP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--jobs", default="1,8")
    parser.add_argument("--n-trials", type=int, default=16)
    parser.add_argument("--preset", default="mnist")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for jobs in (int(j) for j in args.jobs.split(",")):
        row = measure(args.url, jobs, args.n_trials, args.preset)
        print(json.dumps(row) if args.json else row, flush=True)


if __name__ == "__main__":
    main()
