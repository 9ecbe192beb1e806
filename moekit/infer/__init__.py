"""Inference: continuous batching over a paged KV cache, speculative decoding, int8 weights (SPEC section 4).

    from moekit.infer import Engine, SamplingParams
    engine = Engine(model, tokenizer, kv_cache_gb=1.0)
    engine.generate(["def main("], SamplingParams(temperature=0, max_tokens=32))
    moekit generate --model runs/tiny "def main(" --max-tokens 64

Modules, in data-flow order:
  request.py      Request: num_tokens / num_computed_tokens, stop conditions, incremental detokenization
  kv_cache.py     block pool, block tables, prefix caching (hash chains, reference counts, LRU)
  scheduler.py    vLLM-v1-style token-budget scheduler: chunked prefill, preemption, FCFS; update() commits
  runner.py       one forward pass over a ragged batch that reads and writes the paged cache
  sampler.py      SamplingParams; penalties, temperature, min-p, top-k, top-p, seeds, logprobs
  speculative.py  draft-model and n-gram proposers; rejection sampling (Leviathan/Chen et al. 2023)
  engine.py       Engine: add_request / step / abort / stream / generate, metrics
  quant.py        int8 weight-only quantization of linear and expert weights
  tokenizer.py    TextCodec;  loader.py: load a moekit run or a Hugging Face folder
  build.py        EngineConfig (the deployment flags) + build_engine: a model folder -> Engine
  cli.py          `moekit generate`
"""

from moekit.infer.engine import Completion, Engine, RequestOutput
from moekit.infer.sampler import SamplingParams

__all__ = ["Completion", "Engine", "RequestOutput", "SamplingParams"]
