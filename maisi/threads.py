"""How many threads torch computes with, chosen for the machine as it is when a run starts.

On a shared machine the default (one thread per core) is the slow choice: when other work already keeps the
cores busy, torch's threads wait for each other at every parallel region while the scheduler runs someone
else, and a run with 2 threads on 2 loaded cores measured 8.5x slower than with 1 (``tools/bench_threads.py``
measures it on the machine at hand). ``threads: "auto"`` (every config that runs networks, ``--threads`` on
the command line) therefore takes:

1. the CPUs this process may use: its CPU affinity (``taskset``, Slurm, Docker ``--cpuset-cpus``), capped
   by the cgroup's CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``; Docker ``--cpus``,
   Kubernetes limits);
2. shared among the processes of this node under torchrun (``LOCAL_WORLD_SIZE``);
3. less what the rest of the machine keeps busy: the 1-minute load average, scaled to the usable CPUs
   (``load x usable / online CPUs``), is subtracted, and at least 1 thread is left.

The choice is made and applied once per process (:func:`apply_threads`, called by the CLI scaffolding after
the config is checked and before torch computes anything) and recorded in the metadata of what the run
writes (:func:`current`). OpenMP reads its environment when torch is first imported, so ``OMP_NUM_THREADS``
is set then too when torch is not imported yet. A user's own ``OMP_NUM_THREADS`` is what ``auto`` takes
(outside torchrun, which sets it to 1 for every worker itself); a number in the config or on the command line
wins over it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MachineFacts:
    """What the choice depends on, read from the machine (:func:`read_machine`).

    Attributes:
        online_cpus: CPUs of the machine (``os.cpu_count()``); the load average is over these.
        affinity_cpus: CPUs this process may run on (``os.sched_getaffinity``).
        quota_cpus: the cgroup CPU quota in CPUs (e.g. 1.5), or None when there is none.
        load: the 1-minute load average of the machine.
        local_world_size: processes of this job on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 otherwise).
        omp_num_threads: ``OMP_NUM_THREADS`` as the user set it (a positive number), else None; under torchrun
            it is not the user's (torchrun sets it to 1 for every worker) and is None.
    """

    online_cpus: int
    affinity_cpus: int
    quota_cpus: float | None
    load: float
    local_world_size: int
    omp_num_threads: int | None = None


@dataclass(frozen=True)
class ThreadChoice:
    """The threads chosen and why, as the metadata records them.

    Attributes:
        setting: the setting asked for: ``"auto"`` or a number.
        threads: the torch intra-op threads used.
        reason: one line, e.g. ``"auto: 2 usable CPUs, load 13.1 -> 1"``.
    """

    setting: str | int
    threads: int
    reason: str

    def to_json(self) -> dict[str, str | int]:
        """The record written into sample and run metadata."""
        return {"setting": self.setting, "threads": self.threads, "reason": self.reason}


def usable_cpus(facts: MachineFacts) -> int:
    """CPUs this process may use: its affinity, capped by the cgroup quota (rounded up: 1.5 CPUs -> 2)."""
    cpus = facts.affinity_cpus
    if facts.quota_cpus is not None:
        cpus = min(cpus, max(1, math.ceil(facts.quota_cpus - 1e-9)))
    return max(1, cpus)


def decide_threads(setting: str | int, facts: MachineFacts) -> ThreadChoice:
    """The threads for ``setting`` on a machine described by ``facts``; pure (tests give it fake machines).

    Args:
        setting: ``"auto"`` or a positive number of threads (used as given).
        facts: the machine.

    Returns:
        The choice, with the reason in one line.
    """
    if setting != "auto":
        return ThreadChoice(setting, int(setting), f"set to {int(setting)}")
    if facts.omp_num_threads is not None:
        n = facts.omp_num_threads
        return ThreadChoice("auto", n, f"auto: OMP_NUM_THREADS={n} in the environment -> {n}")
    usable = usable_cpus(facts)
    per_process = max(1, usable // max(1, facts.local_world_size))
    busy = max(0.0, facts.load) * usable / max(1, facts.online_cpus)  # the others' share of our CPUs
    spare = (usable - busy) / max(1, facts.local_world_size)
    threads = min(per_process, max(1, math.floor(spare + 0.5)))
    parts = [f"{usable} usable CPU{'s' if usable != 1 else ''}"]
    if facts.quota_cpus is not None and facts.quota_cpus < facts.affinity_cpus:
        parts[0] += f" (cgroup quota {facts.quota_cpus:g} of {facts.affinity_cpus})"
    if facts.local_world_size > 1:
        parts.append(f"{facts.local_world_size} local processes")
    load = f"load {facts.load:.1f}"
    if facts.online_cpus != usable:
        load += f" on {facts.online_cpus} online CPUs"
    parts.append(load)
    return ThreadChoice("auto", threads, f"auto: {', '.join(parts)} -> {threads}")


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 ``cpu.max``, else v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``), or None when unlimited or unreadable."""
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max" and int(text[1]) > 0:
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def read_machine() -> MachineFacts:
    """The facts of this machine and process, now."""
    online = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        affinity = online
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    local = _positive(os.environ.get("LOCAL_WORLD_SIZE")) or 1
    user_omp = os.environ.get("OMP_NUM_THREADS") not in (None, _omp_set_here)  # not what apply_threads set
    omp = (
        _positive(os.environ.get("OMP_NUM_THREADS"))
        if user_omp and "LOCAL_WORLD_SIZE" not in os.environ
        else None
    )
    return MachineFacts(online, affinity, cgroup_quota(), load, local, omp)


def _positive(text: str | None) -> int | None:
    """``text`` as a positive integer, or None (unset, empty, not a number, or not positive)."""
    try:
        value = int(text or "")
    except ValueError:
        return None
    return value if value > 0 else None


_current: ThreadChoice | None = None
_omp_set_here: str | None = None  # the OMP_NUM_THREADS apply_threads set (not the user's)


def current() -> ThreadChoice | None:
    """The choice :func:`apply_threads` applied in this process, or None when it was not called."""
    return _current


def apply_threads(setting: str | int) -> ThreadChoice:
    """Choose the threads for ``setting`` and apply them to this process (once, before any work).

    When torch is not imported yet, ``OMP_NUM_THREADS`` (unless the user set it) is set first, so that
    OpenMP starts with that many threads, and with more than one thread ``OMP_WAIT_POLICY=PASSIVE``
    (unless the user set it): OpenMP's threads then sleep while they wait instead of spinning, which on
    loaded cores measured 3-5x faster with 2 threads (``tools/bench_threads.py``); then
    ``torch.set_num_threads``.

    Args:
        setting: ``"auto"`` or a positive number.

    Returns:
        The choice, also returned by :func:`current` from now on.
    """
    global _current, _omp_set_here
    choice = decide_threads(setting, read_machine())
    if "torch" not in sys.modules:
        if "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = _omp_set_here = str(choice.threads)
        if choice.threads > 1 and "OMP_WAIT_POLICY" not in os.environ:
            # threads that wait sleep at once instead of spinning on cores others need (README 'Speed')
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            choice = dataclasses.replace(choice, reason=f"{choice.reason}, OMP_WAIT_POLICY=PASSIVE")
    import torch

    torch.set_num_threads(choice.threads)
    _current = choice
    return choice


def record() -> dict[str, str | int | None]:
    """What the metadata records: the choice applied in this process, or, when maisi chose none (a library
    call), the threads torch uses now."""
    if _current is not None:
        return _current.to_json()
    import torch

    return {"setting": None, "threads": torch.get_num_threads(), "reason": "not set by maisi (the caller's)"}


def parse_setting(text: str) -> str | int:
    """``--threads`` as given: ``"auto"`` or a positive integer.

    Raises:
        ValueError: anything else, with what is expected.
    """
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected 'auto' or a positive integer, got {text!r}") from None
    if not 1 <= value <= 1024:
        raise ValueError(f"expected 'auto' or an integer in [1, 1024], got {value}")
    return value
