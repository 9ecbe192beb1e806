"""`moekit train --nproc N ...`: start N local training processes under torchrun's elastic agent.

    moekit train --nproc 2 --tp 2 --steps 5          # = torchrun --standalone --nproc-per-node 2 -m moekit train ...

The agent (torch.distributed.launcher.elastic_launch, what `torchrun` runs) gives every worker RANK,
WORLD_SIZE, LOCAL_RANK and a rendezvous, watches them, and when one dies (a crash, SIGKILL, the OOM killer)
stops the others at once; moekit then names the rank that failed and exits non-zero, instead of leaving
the survivors blocked in a collective. No restarts: `--resume` continues from the last checkpoint.
Each worker gets OMP_NUM_THREADS = cores / N unless set: N processes of all cores each would
oversubscribe the CPU (torch's threads slow down 10-80x on a busy 2-core machine).
"""

from __future__ import annotations

import os
import sys
import uuid


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N` (the workers are the N processes)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run `moekit train argv` (without --nproc) on `nproc` local processes; the job's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    env_threads = os.environ.get("OMP_NUM_THREADS")
    if env_threads is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "moekit", "train", *strip_nproc(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = (f"was killed by signal {-failure.exitcode}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        print(f"moekit: error: training rank {rank} of {nproc} {how}; the other ranks were stopped. "
              "Its own error, if it printed one, is above; continue with `moekit train --resume RUN`.",
              file=sys.stderr)
        return 2 if failure.exitcode == 2 else 1  # a worker's user error (one line above) stays exit code 2
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0


__all__ = ["launch", "strip_nproc"]
