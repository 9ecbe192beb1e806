"""Training: GPT-4's recipe (SPEC section 3) at laptop scale, with exact restarts.

    moekit train                                   # the tiny preset on the embedded stdlib corpus
    moekit train --preset gpt4-mini --data code=./src:4 --data text=./docs:2
    moekit train --resume runs/tiny                # continue bit for bit after a crash
    moekit train --init-from runs/tiny --seq-len 1024   # context extension (RoPE interpolation)
    moekit sample runs/tiny "def parse("

Modules, in data-flow order:
  config.py      TrainConfig: every training hyper-parameter, validated
  corpus.py      documents: the embedded standard-library corpus and user sources, split by file
  tokenizer.py   byte-level BPE (Hugging Face `tokenizers`), cached by corpus hash
  data.py        tokenize once into a memory-mapped cache, pack, sample the epoch-weighted mixture
  loop.py        AdamW, warmup + cosine, batch-size ramp, grad accumulation, bf16 autocast, eval
  checkpoint.py  atomic, checksummed checkpoints; exact resume; fallback to the last good one
  metrics.py     MFU against a measured GEMM peak, bits per byte, MoE routing statistics
  cli.py         `moekit train`;  sample.py: `moekit sample` (a KV-cache sampler)
"""
