"""How many CPU threads a process should give torch: the cores it may use, less those other work keeps busy.

    threads = default_threads(reserve=1)      # serving: leave the HTTP event loop a core
    torch.set_num_threads(threads)
    if (why := oversubscribed(threads, reserve=1)): log.warning(why)

Why it matters: torch's intra-op threads (OpenMP) meet at a barrier after every operator, so when one of them
is descheduled because another process holds its core, all of them wait; on a busy 2-core machine a decode step
went from 7 ms with 1 thread to 190-600 ms with 2 (issue 16, issue 17). torch's default, one thread per
*physical core of the machine*, ignores both the process's CPU affinity (containers, `taskset`) and the load.
`usable_cores` reads the affinity (`os.sched_getaffinity`); `busy_cores` samples /proc/stat over a quarter of a
second and counts the cores of that set that were busy, which at start-up (before this process works) is other
work. The count is a snapshot: a job that starts later is not seen, which is why serving also leaves a core spare.
"""

from __future__ import annotations

import os
import time

STAT = "/proc/stat"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cpu_times(path: str = STAT) -> dict[int, tuple[int, int]]:
    """cpu index -> (busy, total) jiffies since boot (iowait counts as idle, steal as busy: another guest ran)."""
    out = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            v = [int(x) for x in fields[:8]] + [0] * max(0, 8 - len(fields))
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            total = user + nice + system + idle + iowait + irq + softirq + steal
            out[int(name[3:])] = (total - idle - iowait, total)
    return out


def busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus) -> float:
    """Cores' worth of busy time on `cpus` between two /proc/stat snapshots."""
    busy = 0.0
    for c in cpus:
        if c not in before or c not in after:
            continue
        d_busy, d_total = after[c][0] - before[c][0], after[c][1] - before[c][1]
        if d_total > 0:
            busy += min(max(d_busy / d_total, 0.0), 1.0)
    return busy


def busy_cores(sample_s: float = 0.25, path: str = STAT) -> float | None:
    """Cores of this process's set kept busy during `sample_s` seconds (by anything); None where /proc/stat is
    not readable."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        before = _cpu_times(path)
        time.sleep(sample_s)
        after = _cpu_times(path)
    except (AttributeError, OSError, ValueError):
        return None
    return busy_between(before, after, cpus)


def default_threads(reserve: int = 0, busy: float | None = None) -> int:
    """Threads for torch: the usable cores, less `reserve` (cores this process needs for other work, such as an
    event loop), less the cores other work keeps busy (`busy`, from `busy_cores`; rounded), at least 1."""
    others = round(busy) if busy is not None else 0
    return max(1, usable_cores() - reserve - others)


def oversubscribed(threads: int, reserve: int = 0, busy: float | None = None) -> str | None:
    """A warning when `threads` + `reserve` + the busy cores exceed the usable ones, else None."""
    cores = usable_cores()
    others = busy if busy is not None else 0.0
    if threads + reserve + others <= cores + 0.5:
        return None
    server = f" + {reserve} for the server" if reserve else ""
    return (f"{threads} torch thread(s){server} + {others:.1f} core(s) busy with other work > the "
            f"{cores} core(s) this process may use: torch's threads wait for each other when one loses its core, "
            "and steps can slow 10-80x; use fewer --threads, or stop the other work")


def process_threads(local_processes: int = 1, env: dict | None = None, busy: float | None = None) -> int | None:
    """Threads for one of `local_processes` processes of a job on this machine (`moekit train`): None when the user
    set OMP_NUM_THREADS (torch already took it), else an equal share of the usable cores that other work leaves
    (`default_threads`), at least 1. torch's default would give every process all the cores."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    return max(1, default_threads(busy=busy) // max(1, local_processes))


class ThreadGovernor:
    """torch's thread count kept at what other work leaves, re-checked while the process runs (serving): every
    `period_s` it compares the busy time of this process's cores (/proc/stat) with the CPU time this process used
    (time.process_time: all its threads) and sets the usable cores less `reserve` less the cores other work keeps
    busy, as `default_threads` does but counting a core from SHARE of one (below).

    A start-up snapshot (`busy_cores`) misses a job that starts later, and torch's threads then wait for the one
    that lost its core at every operator's barrier: on 2 cores with another process spinning on one, gpt4-mini's
    batch-1 decode ran 15.5 tok/s with 2 threads against 26.2 with 1 (39.5 with 2 on a quiet machine; AVX2 EPYC,
    torch 2.14). Other work counts as a core from 0.4 of one (`SHARE`): our own spinning threads take time from it,
    so a process that would keep a core busy reads below 1. Call `tick()` from the thread that runs torch's
    operators: OpenMP keeps the thread count per calling thread.
    """

    SHARE = 0.4

    def __init__(self, reserve: int = 0, period_s: float = 2.0, *, read_stat=None, own_cpu=time.process_time,
                 clock=time.monotonic, set_threads=None, threads: int | None = None):
        import torch

        self.reserve, self.period_s = reserve, period_s
        self._read, self._own, self._clock = read_stat or _cpu_times, own_cpu, clock
        self._set = set_threads or torch.set_num_threads
        self.threads = threads if threads is not None else torch.get_num_threads()
        try:
            self._cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self._cpus = list(range(os.cpu_count() or 1))
        self._mark()

    def _mark(self) -> None:
        self._t, self._cpu = self._clock(), self._own()
        try:
            self._stat = self._read()
        except (OSError, ValueError):
            self._stat = None  # no /proc/stat: nothing to govern by

    def tick(self) -> int | None:
        """Re-check when a period has passed; the new thread count when it changed, else None."""
        now = self._clock()
        if self._stat is None or now - self._t < self.period_s:
            return None
        before, t0, cpu0 = self._stat, self._t, self._cpu
        self._mark()
        if self._stat is None:
            return None
        busy = busy_between(before, self._stat, self._cpus)
        mine = (self._cpu - cpu0) / max(self._t - t0, 1e-9)
        others = max(0.0, busy - mine)
        target = max(1, len(self._cpus) - self.reserve - int(others + 1 - self.SHARE))
        if target == self.threads:
            return None
        self._set(target)
        self.threads = target
        return target
