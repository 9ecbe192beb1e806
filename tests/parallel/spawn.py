"""Start a test file's ranks once: `spawn_ranks(worker.run, world, out)` runs `run(rank, world, init_file, out_dir)`
in `world` spawned processes (gloo, OMP_NUM_THREADS=1 each: DESIGN.md "Distributed code and its tests") and returns
the `rank{r}.json` each wrote, failing the test with the rank's traceback if one failed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest


def spawn_ranks(run, world: int, out: Path, timeout_s: float = 300) -> list[dict]:
    import torch.multiprocessing as mp

    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks before they import torch
        ctx = mp.start_processes(run, args=(world, str(out / "init"), str(out)), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    pytest.fail(f"the {world} ranks did not finish within {timeout_s} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        assert res["error"] is None, f"rank {r} failed:\n{res['error']}"
    return results


def rank_main(rank: int, world: int, init_file: str, out_dir: str, body) -> None:
    """What a spawned rank does around its checks: one thread, join the gloo group (a peer that dies makes a
    collective fail within a minute instead of hanging), run `body(result)` filling the dict, and always write
    `rank{r}.json` (with the traceback on failure) and leave the group."""
    import os
    import traceback
    from datetime import timedelta

    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result: dict = {"cases": {}, "error": None}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        body(result)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        result["seconds"] = time.perf_counter() - t0
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
