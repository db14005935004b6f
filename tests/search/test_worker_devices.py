"""Where `--jobs` workers run: spread over the machine's GPUs in turn, unless the user named one."""

from __future__ import annotations

from search.study.worker import worker_device


def test_jobs_spread_over_the_gpus_in_turn():
    assert [worker_device("cuda", i, 4) for i in range(8)] == [f"cuda:{i}" for i in (0, 1, 2, 3, 0, 1, 2, 3)]
    assert [worker_device("auto", i, 2) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]


def test_a_named_device_or_one_gpu_is_kept():
    assert [worker_device("cuda:2", i, 4) for i in range(3)] == ["cuda:2"] * 3
    assert worker_device("cpu", 5, 8) == "cpu"
    assert worker_device("cuda", 3, 1) == "cuda" and worker_device("auto", 3, 0) == "auto"
