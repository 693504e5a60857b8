"""The paired benchmark's core rotation (bench/core_rotation.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from bench.core_rotation import CoreRotation, process_tree


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_two_groups_swap_cores_and_get_all_cores_back() -> None:
    cores = sorted(os.sched_getaffinity(0))[:2]
    # A shell with a child: the group is the whole tree.
    first = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    second = subprocess.Popen(["sleep", "30"])
    first_tree: set[int] = set()
    try:
        time.sleep(0.2)  # let the shell start its child
        first_tree = process_tree(first.pid)
        assert len(first_tree) == 2
        rotation = CoreRotation(
            lambda: process_tree(first.pid),
            lambda: {second.pid},
            cores=(cores[0], cores[1]),
            period_s=0.3,
            refresh_s=0.3,
        )
        with rotation:
            assert all(os.sched_getaffinity(pid) == {cores[0]} for pid in first_tree)
            assert os.sched_getaffinity(second.pid) == {cores[1]}
            time.sleep(0.45)  # one swap
            assert all(os.sched_getaffinity(pid) == {cores[1]} for pid in first_tree)
            assert os.sched_getaffinity(second.pid) == {cores[0]}
        everything = os.sched_getaffinity(0)
        assert all(os.sched_getaffinity(pid) == everything for pid in first_tree | {second.pid})
        ours, theirs = rotation.cpu_by_name()
        assert set(ours) == {"sh", "sleep"} and set(theirs) == {"sleep"}
    finally:
        for pid in first_tree - {first.pid}:
            os.kill(pid, signal.SIGKILL)  # the shell's child
        for process in (first, second):
            process.kill()
            process.wait()


def test_the_same_two_cores_are_refused() -> None:
    with pytest.raises(ValueError, match="two distinct cores"):
        CoreRotation(set, set, cores=(0, 0))
