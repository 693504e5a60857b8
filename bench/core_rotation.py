"""Run two process groups side by side, one core each, swapping the cores every second.

Why: on a shared VM the speed of a core drifts by tens of percent from one minute to the next,
and the two cores drift apart (see BENCHMARKS.md). Two runs one after the other meet different
speeds; two runs at the same time on fixed cores meet different cores. Run at the same time
and swapped between the cores every `period_s`, both sides meet the same speeds, and what
differs between their wall times is their own work.

Linux only (it reads /proc and sets the affinity of every thread).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def children_by_parent() -> dict[int, list[int]]:
    """Every live process's children, from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name is in parentheses and may hold spaces: the parent id follows it.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def process_tree(root: int, children: dict[int, list[int]] | None = None) -> set[int]:
    """`root` and all its descendants."""
    children = children_by_parent() if children is None else children
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pid: int) -> tuple[str, float] | None:
    """A process's name and the CPU time (user + system) it has used so far."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat.rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3.
    return name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pin(pids: set[int], cores: set[int]) -> None:
    """Set the CPU affinity of every thread of `pids` (new threads inherit it)."""
    for pid in pids:
        try:
            threads = os.listdir(PROC / str(pid) / "task")
        except OSError:
            continue
        for tid in threads:
            try:
                os.sched_setaffinity(int(tid), cores)
            except (OSError, ValueError):
                pass  # the thread exited, or is not ours to move


class CoreRotation:
    """Context manager: two groups of processes on two cores, swapped every `period_s`.

    Each group is a callable returning its current pids, called every `refresh_s` so processes
    started later (Ray workers) are caught; a child inherits its parent's core until then. The
    rotation runs in this process, so its own cost (about 20 ms a refresh) counts against the
    group this process belongs to. On exit every process of both groups gets all cores back.
    """

    def __init__(
        self,
        first: Callable[[], set[int]],
        second: Callable[[], set[int]],
        cores: tuple[int, int] = (0, 1),
        period_s: float = 1.0,
        refresh_s: float = 5.0,
    ) -> None:
        available = os.sched_getaffinity(0)
        if len(set(cores)) != 2 or not set(cores) <= available:
            raise ValueError(
                f"core rotation needs two distinct cores from {sorted(available)}; got {cores}"
            )
        self.groups = (first, second)
        self.cores = cores
        self.period_s = period_s
        self.refresh_every = max(1, round(refresh_s / period_s))
        self._members: tuple[set[int], set[int]] = (set(), set())
        self.all_cores = available
        self.swaps = 0
        self._seen: set[int] = set()
        # pid -> (group index, name, CPU seconds at first sight, latest CPU seconds)
        self._cpu: dict[int, tuple[int, str, float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="core-rotation", daemon=True)

    def _assign(self) -> None:
        if self.swaps % self.refresh_every == 0:
            self._members = (self.groups[0](), self.groups[1]())
        first, second = self._members
        if first & second:
            raise AssertionError(f"a process is in both groups: {sorted(first & second)}")
        flip = self.swaps % 2
        pin(first, {self.cores[flip]})
        pin(second, {self.cores[1 - flip]})
        self._seen |= first | second
        for index, group in enumerate((first, second)):
            for pid in group:
                sample = cpu_seconds(pid)
                if sample is not None:
                    start = self._cpu[pid][2] if pid in self._cpu else sample[1]
                    self._cpu[pid] = (index, sample[0], start, sample[1])
        self.swaps += 1

    def cpu_by_name(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds each group's processes used while rotated (by process name; a process
        that exited counts up to its last sample)."""
        totals: tuple[dict[str, float], dict[str, float]] = ({}, {})
        for index, name, start, latest in self._cpu.values():
            totals[index][name] = totals[index].get(name, 0.0) + latest - start
        return totals

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._assign()

    def __enter__(self) -> CoreRotation:
        self._assign()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        pin(self._seen | self.groups[0]() | self.groups[1](), self.all_cores)
