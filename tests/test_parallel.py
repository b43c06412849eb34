"""stlib.utils.map_processes (several small CPU trainings side by side) and the OpenMP wait policy
that notebook kernels and `stlib` commands get (stlib.run.cpu_thread_env)."""

from __future__ import annotations

import math
import os

import pytest

from stlib.utils import map_processes


def _pid_threads_env(_: int) -> tuple[int, int, str]:
    import torch

    return os.getpid(), torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY", "")


def test_map_processes_keeps_order_and_runs_in_fresh_processes():
    assert map_processes(abs, [-3, 1, -2, 5], workers=2) == [3, 1, 2, 5]
    got = map_processes(_pid_threads_env, range(4), workers=2, threads=1)
    pids = {g[0] for g in got}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {g[1] for g in got} == {1} and {g[2] for g in got} == {"PASSIVE"}


def test_map_processes_in_process_when_one_worker_or_one_item():
    assert map_processes(_pid_threads_env, [0], workers=4)[0][0] == os.getpid()
    assert {g[0] for g in map_processes(_pid_threads_env, range(3), workers=1)} == {os.getpid()}
    assert map_processes(abs, []) == []


def test_map_processes_raises_the_error_of_an_item():
    with pytest.raises(ValueError, match="math domain error"):
        map_processes(math.sqrt, [4.0, -1.0], workers=2)


def test_kernels_get_the_passive_wait_policy(monkeypatch):
    from stlib.run import cpu_thread_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cpu_thread_env()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's choice is kept
    cpu_thread_env()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
