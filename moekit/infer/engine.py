"""The inference engine: continuous batching over a paged KV cache, with speculative decoding.

    engine = Engine(model, tokenizer, kv_cache_gb=1.0)
    outs = engine.generate(["def main(", "import "], SamplingParams(temperature=0, max_tokens=32))
    rid = engine.add_request("Once upon", SamplingParams(max_tokens=50, seed=1))
    for delta in engine.stream(rid):            # drives engine.step() until rid finishes
        print(delta.new_text, end="")

Each `step()` is schedule -> run -> sample -> update, with plain data between them (DESIGN.md
principle 5, vLLM v1's EngineCore.step): the scheduler picks tokens under a budget, the runner
computes them in one forward pass over the paged cache, the sampler (or, for draft tokens, the
rejection sampler) turns logits into tokens, and `Scheduler.update` advances the requests, rolls
back rejected drafts, commits the tokens with their token-level stop checks and finishes the ones
that stopped. The engine then does what needs tensors or text: logprobs, detokenizing and stop
strings (vLLM's output processor), the proposer's bookkeeping; then the proposer, if any, drafts the
next step's tokens. Requests join and leave between any two steps (continuous batching, Yu et al.
2022 "Orca"; SPEC section 4).

The scheduler, its KVCacheManager and the requests hold no tensors: each request's torch.Generator
and its drafts' distributions live here, keyed by request id, until it finishes.

Bad input (an over-long prompt, bad sampling parameters, a draft with another vocabulary) raises
`ValueError` before anything changes, so the engine keeps serving the other requests.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from moekit.infer import speculative
from moekit.infer.batch import RunItem, RunOutput
from moekit.infer.cuda_graphs import DecodeGraphs
from moekit.infer.encoder_cache import EncoderCache, check_images
from moekit.infer.grammar import Grammars, new_bitmask
from moekit.infer.kv_cache import KVCacheManager, PagedKVCache, num_blocks_for
from moekit.infer.request import Request
from moekit.infer.runner import ModelRunner
from moekit.infer.sampler import Logprob, Row, SamplingParams, choose, logprobs, target_probs
from moekit.infer.scheduler import RequestUpdate, Scheduler, SchedulerConfig, SchedulerOutput
from moekit.infer.tokenizer import TextCodec, as_codec
from moekit.model.transformer import Transformer

MAX_FINISHED_KEPT = 10_000  # finished requests kept for `stream`/`result` until collected


@dataclass
class RequestOutput:
    """What one step added to one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    new_logprobs: list[Logprob] = field(default_factory=list)
    # With params.prompt_logprobs, on the request's first output: entry j is prompt token j + 1's (the first
    # prompt token has none: nothing precedes it).
    prompt_logprobs: list[Logprob] | None = None


@dataclass
class Completion:
    """A finished request, as `generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[Logprob]
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    num_preemptions: int
    prompt_logprobs: list[Logprob] | None = None  # with params.prompt_logprobs: prompt tokens 1.. (see RequestOutput)


@dataclass
class Counters:
    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    computed_tokens: int = 0  # tokens through the target's forward pass (recomputation included)
    generated_tokens: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0
    spec_drafted_per_pos: list[int] = field(default_factory=list)
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    tokens_per_expert: torch.Tensor | None = None  # (MoE layers, E), cumulative


@dataclass
class StepRecord:
    """What the micro-batch completed by the last `step()` computed, as the scheduler made it: plain data for the
    server's step log (`moekit serve --step-log`) and `moekit sim calibrate`."""

    scheduled: list[tuple[str, int, int, int, int]]  # (request id, tokens, computed before, n_spec, num_logits)
    preempted: list[str]  # requests preempted when this micro-batch was scheduled
    submitted: int  # micro-batches submitted during that step() call (pipelined: up to max_in_flight)


class Engine:
    def __init__(self, model: Transformer | None, tokenizer=None, *, kv_cache_gb: float | None = None,
                 num_blocks: int | None = None, block_size: int = 16, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 draft: Transformer | None = None, ngram: bool = False, num_spec_tokens: int = 4,
                 eos_token_ids: Sequence[int] | None = None, enforce_eager: bool = False, executor=None):
        # executor: a moekit.infer.executor.WorkerGroup holding the model sharded over tp x pp workers (model is
        # then None); this process keeps the scheduler, the KV bookkeeping, the sampler and any draft model.
        self.executor = executor
        if executor is not None:
            self.model, self.cfg = None, executor.cfg
            self.device, dtype = torch.device("cpu"), executor.dtype
        else:
            self.model = model.eval()
            self.cfg = model.cfg
            w = model.tok_emb.weight
            self.device, dtype = w.device, w.dtype
        cfg = self.cfg
        self.codec: TextCodec | None = as_codec(tokenizer)
        self.eos_token_ids = tuple(eos_token_ids if eos_token_ids is not None else
                                   (self.codec.eos_token_ids if self.codec else ()))
        if num_blocks is None:
            num_blocks = num_blocks_for(cfg, 1.0 if kv_cache_gb is None else kv_cache_gb, block_size, dtype)
            # More blocks than max_num_seqs full-length requests can hold would never be used: cap the
            # allocation (a tiny model in a 1 GiB budget would otherwise zero 1 GiB for nothing).
            full = -(-min(cfg.max_seq_len, max_model_len or cfg.max_seq_len) // block_size)
            num_blocks = min(num_blocks, max_num_seqs * full)
            if executor is not None:  # each worker fits its budget to its own stage: the fullest stage decides
                num_blocks = min(executor.capacity_blocks, max_num_seqs * full)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.cache = None
        if executor is None:
            self.cache = PagedKVCache(cfg, num_blocks, block_size, dtype, self.device)
        else:
            executor.start_cache(num_blocks, block_size)
        # One request must always fit the whole pool, or it could wait forever.
        limits = [cfg.max_seq_len, num_blocks * block_size] + ([max_model_len] if max_model_len else [])
        if draft is not None:
            limits.append(draft.cfg.max_seq_len)
        self.max_model_len = min(limits)
        if self.max_model_len < 2:
            raise ValueError(f"the KV cache holds {num_blocks * block_size} tokens, too few to serve anything: "
                             "raise --kv-cache-gb")
        self.runner = ModelRunner(model, self.cache) if executor is None else None
        # Steps submitted and not yet sampled: up to one per pipeline stage, so that every stage is busy.
        self.max_in_flight = executor.max_in_flight if executor is not None else 1
        self.in_flight: deque[tuple[SchedulerOutput, list[RunItem], object]] = deque()
        # On a GPU, decode steps replay CUDA graphs of the runner's model call unless enforce_eager (vLLM's
        # flag of the same name).
        self.graphs = None
        if self.device.type == "cuda" and not enforce_eager and executor is None:
            self.graphs = DecodeGraphs(self.runner, self.max_model_len, max_num_seqs)
        self.scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens, max_num_seqs, self.max_model_len), self.kv)
        if num_spec_tokens < 1:
            raise ValueError(f"num_spec_tokens must be >= 1, got {num_spec_tokens}")
        self.proposer = None
        if draft is not None and ngram:
            raise ValueError("choose one proposer: a draft model or n-gram lookup, not both")
        if draft is not None:
            if draft.cfg.vocab_size != cfg.vocab_size:
                raise ValueError(f"the draft model has a vocabulary of {draft.cfg.vocab_size} tokens and the target "
                                 f"{cfg.vocab_size}: a draft must use the target's tokenizer")
            self.proposer = speculative.DraftProposer(draft.eval(), num_blocks, block_size, num_spec_tokens)
        elif ngram:
            self.proposer = speculative.NgramProposer(num_spec_tokens)
        self.num_spec_tokens = num_spec_tokens
        self.requests: dict[str, Request] = {}  # unfinished
        self.finished: dict[str, Request] = {}  # finished, not yet collected
        # Tensor state of unfinished requests, beside them so that Request stays plain data.
        self.generators: dict[str, torch.Generator] = {}  # each request draws from its own (sampler.py)
        self.draft_probs: dict[str, torch.Tensor] = {}  # (K, V) the draft's q of the pending drafts
        self.grammars: Grammars | None = None  # structured output: made on the first constrained request
        self.encoder_cache = EncoderCache()  # images' cross-attention K/V per request (encoder_cache.py)
        if cfg.has_vision and executor is not None:
            raise ValueError("a vision model is served in one process for now: drop --tp/--pp")
        self.counters = Counters()
        self.last_step: StepRecord | None = None  # the micro-batch the last step() completed; None: it did nothing
        self._arrivals = 0
        self._seeds = random.Random()

    # ---- requests ---------------------------------------------------------------------------------
    def _make_request(self, prompt: str | Sequence[int], params: SamplingParams | None,
                      request_id: str | None, images: Sequence[torch.Tensor] = ()) -> tuple[Request, torch.Generator]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.codec is None:
                raise ValueError("this engine has no tokenizer: pass the prompt as a list of token ids")
            ids = self.codec.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size}), got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                             "(prompt + output): shorten the prompt")
        if params.stop and self.codec is None:
            raise ValueError("stop strings need a tokenizer to detokenize the output; use stop_token_ids")
        if params.logit_bias and max(params.logit_bias) >= self.cfg.vocab_size:
            raise ValueError(f"logit_bias holds token id {max(params.logit_bias)}, which is not in this model's "
                             f"vocabulary: ids are in [0, {self.cfg.vocab_size})")
        matcher = None
        if params.constraint is not None:
            if self.codec is None:
                raise ValueError("structured output needs the model's tokenizer (its vocabulary's text)")
            if self.grammars is None:  # on the first constrained request: imports xgrammar
                self.grammars = Grammars(self.codec.tokenizer, self.cfg.vocab_size, self.eos_token_ids)
            try:  # compiled once per constraint (cached); ValueError: what the grammar engine said
                matcher = self.grammars.matcher(params.constraint)
            except ValueError as e:
                raise ValueError(f"the {params.constraint.kind} constraint cannot be compiled: {e}") from None
        rid = request_id if request_id is not None else f"req-{self._arrivals}"
        if rid in self.requests or rid in self.finished:
            raise ValueError(f"request id {rid!r} is already in use")
        positions, salt = check_images(self.cfg, ids, images) if images else ([], None)
        if not images and self.cfg.has_vision and self.cfg.vision.image_token_id in ids:
            raise ValueError(f"the prompt holds an image marker (token {self.cfg.vision.image_token_id}) but no "
                             "image was given: send the image with it")
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on any device
        req = Request(rid, ids, params, arrival=self._arrivals, eos_token_ids=self.eos_token_ids,
                      image_positions=positions, cache_salt=salt, read_prefix_cache=params.prompt_logprobs is None)
        req.grammar = matcher
        return req, gen

    def _submit(self, req: Request, generator: torch.Generator, images: Sequence[torch.Tensor] = ()) -> str:
        if images:  # the encoder and resampler run once per request, now; their K/V stay until it finishes
            self.encoder_cache.add(req.request_id, self.model, images)
        self._arrivals += 1
        self.requests[req.request_id] = req
        self.generators[req.request_id] = generator
        self.counters.prompt_tokens += req.num_prompt_tokens
        self.scheduler.add(req)
        return req.request_id

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, images: Sequence[torch.Tensor] = ()) -> str:
        """Queue a request; its id. A bad request raises ValueError and changes nothing.

        images: pixels (C, H, W) as moekit.images.to_pixels gives them, one per `<image>` marker of the prompt,
        in order (a vision model only)."""
        images = list(images or ())
        return self._submit(*self._make_request(prompt, params, request_id, images), images)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self._finish(req, "abort")
        return True

    def _finish(self, req: Request, reason: str) -> None:
        """Retire a request; the scheduler frees its blocks unless `Scheduler.update` already finished it."""
        self.requests.pop(req.request_id, None)
        if not req.finished:
            self.scheduler.finish(req, reason)
        else:  # a stop string in this step's text outranks the token-level "length" (as in vLLM)
            req.finish_reason = reason
        self.generators.pop(req.request_id, None)
        self.draft_probs.pop(req.request_id, None)
        req.grammar = None  # its matcher's memory goes now, not when the result is collected
        self.encoder_cache.free(req.request_id)
        if self.proposer is not None:
            self.proposer.free(req)
        self.finished[req.request_id] = req
        while len(self.finished) > MAX_FINISHED_KEPT:
            self.finished.pop(next(iter(self.finished)))

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------------------
    def _submit_run(self, items: list[RunItem]):
        """Start one step's forward pass; a handle for `_wait_run`. In one process it runs now (a replayed CUDA
        graph when the step has a captured shape); with workers it is sent and runs while the next is scheduled."""
        if self.executor is not None:
            return self.executor.submit(items)
        with_images = any(it.image_positions for it in items)
        if self.graphs is not None and not with_images and self.graphs.can_run(items):
            return self.graphs.run(items)
        if with_images:
            return self.runner.forward(items, encoder_kv=[self.encoder_cache.get(it.request_id) for it in items])
        return self.runner.forward(items)

    def _wait_run(self, handle) -> RunOutput:
        return self.executor.wait(handle) if self.executor is not None else handle

    def capture_graphs(self) -> int:
        """Capture the CUDA graphs of every decode (and, when speculating, verification) shape now, as vLLM
        does at start-up, so that no request waits for a capture; how many were built (0: graphs off)."""
        if self.graphs is None:
            return 0
        queries = (1, 1 + self.num_spec_tokens) if self.proposer is not None else (1,)
        return self.graphs.capture_all(queries)

    def _schedule(self) -> tuple[SchedulerOutput, list[RunItem]]:
        """The next micro-batch. With a pipeline, requests whose last step is still in flight are passed over (their
        next token is not sampled yet), and each micro-batch takes its share of the requests, so that pp of them
        keep the stages busy (`Scheduler.micro_batch_share`)."""
        limit = self.scheduler.micro_batch_share(self.max_in_flight)
        busy = self._busy()
        sched = self.scheduler.schedule(skip=busy, max_seqs=limit) if busy or limit else self.scheduler.schedule()
        for req in sched.preempted:  # recomputed from scratch later: its drafts are dropped
            self.draft_probs.pop(req.request_id, None)
            if self.proposer is not None:
                self.proposer.free(req)
        items = []
        for s in sched.scheduled:
            req = s.request
            c = req.num_computed_tokens
            n = s.num_tokens - len(s.spec_token_ids)
            tokens = req.all_token_ids[c:c + n] + s.spec_token_ids
            # Prompt logprobs: positions c .. of this chunk that precede a prompt token (recomputed after a
            # preemption; _prompt_logprobs keeps the first ones computed).
            last = req.num_prompt_tokens - 1
            targets = (req.all_token_ids[c + 1:min(c + n, last) + 1]
                       if req.params.prompt_logprobs is not None and c < last else [])
            items.append(RunItem(tokens, c, self.kv.block_ids(req.request_id),
                                 len(s.spec_token_ids) + 1 if s.reaches_end else 0, req.request_id,
                                 req.image_positions, targets, req.params.prompt_logprobs or 0))
        return sched, items

    def _busy(self) -> set[str]:
        """Requests whose step is in flight (submitted to the workers, not yet sampled)."""
        return {s.request.request_id for sched, _, _ in self.in_flight for s in sched.scheduled}

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, update; the deltas of the requests that moved. With a pipeline
        (max_in_flight > 1) it first fills the pipeline with micro-batches, then completes the oldest."""
        self.last_step = None
        submitted = 0
        while len(self.in_flight) < self.max_in_flight:
            sched, items = self._schedule()
            if not sched.scheduled:
                break
            self.in_flight.append((sched, items, self._submit_run(items)))
            submitted += 1
        if not self.in_flight:
            return []
        sched, items, handle = self.in_flight.popleft()
        # Built from the step's own plain data before _complete drops requests aborted in flight: the record says
        # what the forward pass computed (an item's start is the request's num_computed_tokens when scheduled).
        self.last_step = StepRecord(
            [(it.request_id, s.num_tokens, it.start, len(s.spec_token_ids), it.num_logits)
             for s, it in zip(sched.scheduled, items, strict=True)],
            [r.request_id for r in sched.preempted], submitted)
        out = self._wait_run(handle)
        return self._complete(sched, items, out)

    def _complete(self, sched: SchedulerOutput, items: list[RunItem], out: RunOutput) -> list[RequestOutput]:
        cnt = self.counters
        cnt.steps += 1
        cnt.computed_tokens += sched.num_tokens
        if out.tokens_per_expert_LE is not None:
            cnt.tokens_per_expert = out.tokens_per_expert_LE + (
                cnt.tokens_per_expert if cnt.tokens_per_expert is not None else 0)
        logits_RV = out.logits_RV
        if any(it.prompt_targets for it in items):
            logits_RV = self._prompt_logprobs(sched, items, logits_RV)
        if any(s.request.finished for s in sched.scheduled):  # aborted while its step was in flight: drop it
            rows, r, keep = [], 0, []
            for s, it in zip(sched.scheduled, items, strict=True):
                if not s.request.finished:
                    keep.append((s, it))
                    rows += range(r, r + it.num_logits)
                r += it.num_logits
            sched = SchedulerOutput([s for s, _ in keep], sched.preempted)
            items = [it for _, it in keep]
            logits_RV = logits_RV[torch.tensor(rows, dtype=torch.long)]
            if not items:
                return []

        sampled, first_row = self._sample(sched, items, logits_RV)
        outputs = [self._output(u, logits_RV, first_row[u.request.request_id])
                   for u in self.scheduler.update(sched, sampled)]
        if self.proposer is not None:
            self._propose()
        return outputs

    @staticmethod
    def _prompt_logprobs(sched: SchedulerOutput, items: list[RunItem], logits_RV: torch.Tensor) -> torch.Tensor:
        """Turn the step's prompt-logprob rows (after the sampling rows) into each request's prompt logprobs; the
        sampling rows. A chunk recomputed after a preemption adds nothing: those positions are done already."""
        r = sum(it.num_logits for it in items)
        sample_RV = logits_RV[:r]
        for s, it in zip(sched.scheduled, items, strict=True):
            k = len(it.prompt_targets)
            if not k:
                continue
            req, rows = s.request, logits_RV[r:r + k]
            r += k
            have = max(len(req.prompt_logprobs) - it.start, 0)  # entry j is position j's; the chunk starts at start
            if have < k and not req.finished:
                req.prompt_logprobs += logprobs(rows[have:], it.prompt_targets[have:], [it.prompt_top] * (k - have))
        return sample_RV

    def _sample(self, sched: SchedulerOutput, items: list[RunItem],
                logits_RV: torch.Tensor) -> tuple[dict[str, list[int]], dict[str, int]]:
        """The tokens each request emits this step (`Scheduler.update`'s input), and its first logits row."""
        # Every row to sample, across requests, goes through the sampler's tensor code at once; the
        # requests without drafts get their token in the same batched call (one device sync).
        rows, first_row, plain = [], {}, []
        for s, it in zip(sched.scheduled, items, strict=True):
            req, spec = s.request, s.spec_token_ids
            if not it.num_logits:  # a prefill chunk that does not reach the prompt's end yet
                continue
            first_row[req.request_id] = len(rows)
            if not spec:
                plain.append(len(rows))
            history = req.output_token_ids if req.params.has_penalties else []  # only penalties read it
            gen = self.generators[req.request_id]
            for i in range(it.num_logits):
                rows.append(Row(req.params, gen, req.prompt_token_ids, history + spec[:i], req.grammar is not None))
        if not rows:
            return {}, first_row
        bitmask_RW = None
        if any(r.masked for r in rows):  # one packed grammar mask for the step; a request's rows: its drafts' prefixes
            bitmask_RW = new_bitmask(len(rows), self.cfg.vocab_size)
            for s in sched.scheduled:
                if s.request.grammar is not None and s.request.request_id in first_row:
                    s.request.grammar.fill_rows(bitmask_RW, first_row[s.request.request_id], s.spec_token_ids)
        probs_RV = target_probs(logits_RV, rows, bitmask_RW)
        chosen = dict(zip(plain, choose(probs_RV[plain], [rows[i] for i in plain]), strict=True)) if plain else {}
        sampled = {}
        for s in sched.scheduled:
            req, spec = s.request, s.spec_token_ids
            rid = req.request_id
            if rid not in first_row:
                continue
            r0 = first_row[rid]
            q_KV = self.draft_probs.pop(rid, None)  # consumed: the next step has new drafts, or none
            if spec:
                q_KV = q_KV[:len(spec)] if q_KV is not None else None
                sampled[rid] = speculative.verify(probs_RV[r0:r0 + len(spec) + 1], spec, q_KV,
                                                  self.generators[rid], req.params.greedy)
            else:
                sampled[rid] = [chosen[r0]]
        return sampled, first_row

    def _output(self, u: RequestUpdate, logits_RV: torch.Tensor, r0: int) -> RequestOutput:
        """The engine's side of one request's update: logprobs, text and stop strings, the proposer."""
        req, committed, reason = u.request, u.new_token_ids, u.finish_reason
        if u.num_draft_tokens:
            self._count_spec(u.num_draft_tokens, u.num_accepted)
        if req.params.logprobs is not None:
            req.logprobs += logprobs(logits_RV[r0:r0 + len(committed)], committed,
                                     [req.params.logprobs] * len(committed))
        self.counters.generated_tokens += len(committed)
        if req.grammar is not None and not reason:
            for t in committed:  # each came from a masked row, so the grammar takes it (unless it already ended)
                if not req.grammar.accept(t) and not req.grammar.ended:
                    raise RuntimeError(f"request {req.request_id}: token {t} is outside its grammar")
            if req.grammar.finished:  # it accepts nothing more but EOS: the output is complete (vLLM: "stop")
                reason = "stop"
        if self.codec is not None:
            new_text = req.detokenize(self.codec.decode)
            if req.params.stop and req.check_stop_strings(new_text):
                reason = "stop"
            elif not req.params.stop:
                req.text += new_text
        if self.proposer is not None and not reason:
            # The scheduler trimmed the target's blocks; now the draft's. Also when the budget cut all the
            # request's drafts (none verified): the draft's K/V past the target's still holds them.
            self.proposer.rollback(req)
        if reason:
            self._finish(req, reason)
        hold = 0 if reason else max(req.params.max_stop_len - 1, 0)  # a stop string may be starting
        sent = req.text_sent
        req.text_sent = max(sent, len(req.text) - hold)
        first = req.params.prompt_logprobs is not None and req.num_output_tokens == len(committed)
        return RequestOutput(req.request_id, committed, req.text[sent:req.text_sent], req.finished,
                             req.finish_reason, req.logprobs[len(req.logprobs) - len(committed):]
                             if req.params.logprobs is not None else [], req.prompt_logprobs if first else None)

    def _count_spec(self, n_draft: int, n_acc: int) -> None:
        cnt = self.counters
        grow = n_draft - len(cnt.spec_drafted_per_pos)
        if grow > 0:
            cnt.spec_drafted_per_pos += [0] * grow
            cnt.spec_accepted_per_pos += [0] * grow
        cnt.spec_drafted += n_draft
        cnt.spec_accepted += n_acc
        for i in range(n_draft):
            cnt.spec_drafted_per_pos[i] += 1
            cnt.spec_accepted_per_pos[i] += i < n_acc

    def _propose(self) -> None:
        reqs, ks = [], []
        busy = self._busy()
        for req in self.scheduler.running:
            if req.request_id in busy:
                continue  # its step is in flight: the token it will add is not known yet
            if req.num_computed_tokens != req.num_tokens - 1:
                continue  # still prefilling
            if req.spec_token_ids:
                continue  # not scheduled this step (the budget ran out first): its drafts are still pending
            # Never draft past the request's limits: the bonus token needs one slot of its own.
            room = min(req.params.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens)
            k = min(self.num_spec_tokens, room - 1)
            if k >= 1:
                reqs.append(req)
                ks.append(k)
        if reqs:
            qs = self.proposer.propose(reqs, ks, [self.generators[r.request_id] for r in reqs])
            for req, q_KV in zip(reqs, qs, strict=True):
                if q_KV is not None:
                    self.draft_probs[req.request_id] = q_KV
                else:
                    self.draft_probs.pop(req.request_id, None)

    # ---- collecting results -------------------------------------------------------------------------
    def stream(self, request_id: str) -> Iterator[RequestOutput]:
        """Deltas of one request until it finishes, stepping the engine (and so every request) as needed."""
        req = self.requests.get(request_id) or self.finished.get(request_id)
        if req is None:
            raise ValueError(f"unknown request id {request_id!r}")
        n_tok, n_text = 0, 0
        while True:
            hold = 0 if req.finished else max(req.params.max_stop_len - 1, 0)
            text_end = max(n_text, len(req.text) - hold)
            if req.num_output_tokens > n_tok or text_end > n_text or req.finished:
                toks = req.output_token_ids[n_tok:]
                lps = req.logprobs[n_tok:] if req.params.logprobs is not None else []
                first = n_tok == 0 and toks and req.params.prompt_logprobs is not None
                delta = RequestOutput(request_id, toks, req.text[n_text:text_end], req.finished,
                                      req.finish_reason, lps, req.prompt_logprobs if first else None)
                n_tok, n_text = req.num_output_tokens, text_end
                yield delta
                if req.finished:
                    self.finished.pop(request_id, None)
                    return
            else:
                self.step()

    def result(self, request_id: str) -> Completion:
        """The completion of a finished request (collected: a second call raises)."""
        req = self.finished.pop(request_id, None)
        if req is None:
            raise ValueError(f"request {request_id!r} is unknown, unfinished or already collected")
        return Completion(req.request_id, req.prompt_token_ids, req.output_token_ids, req.text,
                          req.finish_reason or "", req.logprobs, req.num_cached_tokens, req.num_preemptions,
                          req.prompt_logprobs if req.params.prompt_logprobs is not None else None)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 images: Sequence[Sequence[torch.Tensor]] | None = None) -> list[Completion]:
        """Run every prompt to completion (continuously batched with any other queued request); images: per
        prompt, its images (see add_request)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        ilist = [list(x or ()) for x in images] if images is not None else [[] for _ in prompts]
        if len(ilist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(ilist)} image lists")
        made = []
        for i, (p, sp, im) in enumerate(zip(prompts, plist, ilist, strict=True)):  # validate all before queueing
            req, gen = self._make_request(p, sp, f"gen-{self._arrivals + i}", im)
            req.arrival = self._arrivals + i
            made.append((req, gen, im))
        ids = []
        for req, gen, im in made:
            ids.append(self._submit(req, gen, im))
        while any(rid in self.requests for rid in ids):
            self.step()
        return [self.result(rid) for rid in ids]

    # ---- metrics ------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """Counters for the server's /metrics: queue, KV pool, prefix cache, preemption, speculation, experts."""
        c, kv = self.counters, self.kv
        return {
            "requests_running": self.scheduler.num_running,
            "requests_waiting": self.scheduler.num_waiting,
            "kv_blocks_total": kv.num_blocks,
            "kv_blocks_used": kv.num_blocks - kv.num_free_blocks,
            "kv_blocks_free": kv.num_free_blocks,
            "kv_blocks_cached": len(kv.pool.cached),
            "kv_block_size": kv.block_size,
            "kv_bytes_per_token": self.cache.bytes_per_token if self.cache else
            self.executor.kv_bytes_per_token,
            "max_model_len": self.max_model_len,
            "prefix_cache_queries": kv.queries,
            "prefix_cache_hits": kv.hits,
            "preemptions": self.scheduler.num_preemptions,
            "steps": c.steps,
            "prompt_tokens": c.prompt_tokens,
            "computed_tokens": c.computed_tokens,
            "generated_tokens": c.generated_tokens,
            "spec_drafted": c.spec_drafted,
            "spec_accepted": c.spec_accepted,
            "spec_drafted_per_pos": list(c.spec_drafted_per_pos),
            "spec_accepted_per_pos": list(c.spec_accepted_per_pos),
            "tokens_per_expert": c.tokens_per_expert.tolist() if c.tokens_per_expert is not None else [],
            "images_encoded": self.encoder_cache.images_encoded,
            "encoder_cache_requests": len(self.encoder_cache.entries),
            "encoder_cache_bytes": self.encoder_cache.nbytes,
        }

    def check_workers(self) -> None:
        """Raise moekit.infer.executor.WorkerFailed if a worker of a sharded model died (a no-op in one process)."""
        if self.executor is not None:
            self.executor.check()

    def worker_metrics(self) -> list[dict]:
        """Each worker's figures (weights, KV blocks, tokens per expert, time in collectives); [] in one process."""
        return self.executor.metrics() if self.executor is not None else []

    def close(self) -> None:
        """Stop the workers of a sharded model (killed when one has failed: the others may wait on it)."""
        if self.executor is not None:
            if self.executor.failure is not None:
                self.executor.kill()
            self.executor.close()

    def check_idle(self) -> None:
        """Raise unless no request is alive and the KV pools are whole (for tests)."""
        if self.requests:
            raise AssertionError(f"requests still alive: {list(self.requests)[:4]}")
        if self.generators or self.draft_probs:
            raise AssertionError(f"per-request state left: {list(self.generators)[:4]} {list(self.draft_probs)[:4]}")
        self.kv.check_whole()
        self.encoder_cache.check_empty()
        if isinstance(self.proposer, speculative.DraftProposer):
            self.proposer.kv.check_whole()
