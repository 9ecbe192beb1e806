"""moekit/cpu.py: the cores a process may use, the busy ones from /proc/stat, and the thread default."""

import os
import subprocess
import sys

import pytest

from moekit import cpu

STAT_BEFORE = """cpu  100 0 100 800 0 0 0 0 0 0
cpu0 50 0 50 400 0 0 0 0 0 0
cpu1 50 0 50 400 0 0 0 0 0 0
intr 12345
"""
# cpu0 fully busy for 100 jiffies (user), cpu1 a quarter busy (system + steal), iowait counts as idle.
STAT_AFTER = """cpu  250 0 125 875 0 0 0 0 0 0
cpu0 150 0 50 400 0 0 0 0 0 0
cpu1 50 0 70 455 20 0 0 5 0 0
intr 12399
"""


def write(tmp_path, text):
    f = tmp_path / "stat"
    f.write_text(text)
    return str(f)


def test_busy_cores_between_two_snapshots(tmp_path):
    before = cpu._cpu_times(write(tmp_path, STAT_BEFORE))
    after = cpu._cpu_times(write(tmp_path, STAT_AFTER))
    assert before == {0: (100, 500), 1: (100, 500)}
    assert cpu.busy_between(before, after, [0]) == pytest.approx(1.0)
    assert cpu.busy_between(before, after, [1]) == pytest.approx(25 / 100)
    assert cpu.busy_between(before, after, [0, 1, 7]) == pytest.approx(1.25)  # a cpu not in the file counts 0


def test_default_threads_leave_the_reserve_and_the_busy_cores(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 8)
    assert cpu.default_threads() == 8
    assert cpu.default_threads(reserve=1) == 7
    assert cpu.default_threads(reserve=1, busy=2.4) == 5
    assert cpu.default_threads(reserve=1, busy=30) == 1  # never below one
    assert cpu.oversubscribed(7, reserve=1, busy=0.2) is None
    why = cpu.oversubscribed(7, reserve=1, busy=2.0)
    assert why and "2.0 core(s) busy" in why and "the 8 core(s)" in why


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_usable_cores_follow_the_affinity_mask():
    """A process pinned to one core (as a container or taskset would) gets one thread, not the machine's count."""
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from moekit import cpu; " \
           "print(cpu.usable_cores(), cpu.default_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]
    assert cpu.usable_cores() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_a_busy_loop_is_seen_as_a_busy_core():
    """A process spinning on one core of the set shows up as about one busy core (other load only adds)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert cpu.busy_cores(0.5) >= 0.7
    finally:
        hog.kill()
        hog.wait()


def test_a_training_process_takes_its_share_of_the_free_cores_unless_omp_num_threads_is_set(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 8)
    assert cpu.process_threads(1, env={}) == 8
    assert cpu.process_threads(4, env={}) == 2
    assert cpu.process_threads(2, env={}, busy=2.2) == 3  # 8 - 2 busy, halved
    assert cpu.process_threads(16, env={}) == 1  # never below one
    assert cpu.process_threads(1, env={"OMP_NUM_THREADS": "3"}) is None  # torch already took the user's figure


class FakeHost:
    """Two cores' /proc/stat, this process's CPU time and a clock, advanced by hand: `run(seconds, mine, others)`
    spends `mine` cores' worth of this process and `others` cores' worth of other work, spread over the cores."""

    def __init__(self, cores: int = 2):
        self.t, self.own, self.cores = 0.0, 0.0, cores
        self.busy, self.total = [0.0] * cores, [0.0] * cores
        self.threads: list[int] = []

    def run(self, seconds: float, mine: float, others: float) -> None:
        load = min(mine + others, self.cores) / self.cores
        for c in range(self.cores):
            self.busy[c] += 100 * seconds * load
            self.total[c] += 100 * seconds
        self.t += seconds
        self.own += mine * seconds

    def stat(self) -> dict[int, tuple[int, int]]:
        return {c: (round(self.busy[c]), round(self.total[c])) for c in range(self.cores)}

    def governor(self, reserve: int = 0, threads: int = 2) -> cpu.ThreadGovernor:
        gov = cpu.ThreadGovernor(reserve, period_s=2.0, read_stat=self.stat, own_cpu=lambda: self.own,
                                 clock=lambda: self.t, set_threads=self.threads.append, threads=threads)
        gov._cpus = list(range(self.cores))  # the fake host's cores, whatever this machine's affinity
        return gov


def test_the_governor_gives_up_a_core_to_other_work_and_takes_it_back():
    host = FakeHost()
    gov = host.governor()
    host.run(1.0, mine=2.0, others=0.0)
    assert gov.tick() is None and host.threads == []  # within the period: not even read
    host.run(1.5, mine=2.0, others=0.0)
    assert gov.tick() is None and gov.threads == 2  # quiet: both cores stay ours
    host.run(2.0, mine=1.3, others=0.7)  # a job spinning on a core; our spinning threads take 0.3 of its share
    assert gov.tick() == 1 and host.threads == [1]
    host.run(2.0, mine=1.0, others=1.0)
    assert gov.tick() is None  # unchanged: not set again
    host.run(2.0, mine=1.0, others=0.1)  # the job ended (a little background noise)
    assert gov.tick() == 2 and host.threads == [1, 2]


def test_the_governor_keeps_at_least_one_thread_and_the_reserve():
    host = FakeHost()
    gov = host.governor(reserve=1, threads=1)  # serving on 2 cores: one for the event loop
    host.run(2.5, mine=1.0, others=2.0)  # everything else busy too
    assert gov.tick() is None and gov.threads == 1
    host = FakeHost(cores=4)
    gov = host.governor(reserve=1, threads=3)
    host.run(2.5, mine=2.0, others=1.5)  # 1.5 cores of other work: two of them count (0.4 of a core is one)
    assert gov.tick() == 1


def test_the_governor_does_nothing_without_proc_stat():
    def unreadable():
        raise OSError("no /proc/stat")

    threads = []
    gov = cpu.ThreadGovernor(0, read_stat=unreadable, clock=lambda: 100.0, set_threads=threads.append, threads=2)
    assert gov.tick() is None and threads == []
