"""Parallelism applied to a built model from outside (DESIGN.md "Distributed code and its tests"); never imported
by moekit/model/.

  mesh.py    torchrun env -> ParallelDims (--dp, --tp, --zero) -> one DeviceMesh; a world of one needs no group
  data.py    DDP / ZeRO-1 / FSDP2 (zero 0|1|2|3), gradient sync for accumulation, global-norm clipping
  tensor.py  tensor + sequence parallel plans (DTensor)

Run the multi-process tests with `.venv/bin/python -m pytest tests/parallel` (gloo, 2 ranks on a CPU).
"""
