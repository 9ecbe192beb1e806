"""Sampling: logits -> next tokens, per request, with OpenAI/vLLM parameters.

    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, seed=1, stop=["\\n\\n"])

The order of operations is vLLM v1's (vllm/v1/sample/sampler.py): logit_bias (OpenAI: added to the
token's logit), penalties on the raw logits (repetition over prompt + output, as Keskar et al.
2019 / Hugging Face; presence and frequency over the output, as OpenAI), the token mask of a
structured-output request's grammar (grammar.py: -inf on the tokens it refuses; one packed mask for
the step's rows), then greedy argmax or: temperature, min-p (Nguyen et al. 2024), top-k, top-p
(Holtzman et al. 2020), softmax, one draw. The mask comes before every truncation, so that greedy
and sampled outputs both obey it. Each request draws from its own CPU
`torch.Generator`, seeded from `seed`, so the same seed gives the same text whatever else is in
the batch; a draw is the inverse CDF of one uniform, so a whole batch is sampled with one device
sync. Logprobs are those of the raw model distribution (vLLM's default "raw_logprobs"), with the
top-N alternatives.

Shape legend: R rows (one per token to sample; a speculative request has k + 1), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit.infer.grammar import Constraint, apply_bitmask

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM _SAMPLING_EPS)
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_LOGIT_BIAS = 100  # OpenAI's range of a logit_bias value: [-100, 100]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = all tokens
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    presence_penalty: float = 0.0  # subtracted once from every token that appeared in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output
    seed: int | None = None  # None: a fresh random seed
    stop: list[str] = field(default_factory=list)  # the output ends before the first of these
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # return the sampled token's logprob and this many alternatives
    # Return each prompt token's logprob (given the tokens before it) and this many alternatives: vLLM's
    # `prompt_logprobs`, what `echo` with `logprobs` needs (loglikelihood evaluation). Such a request does not read
    # the prefix cache: a cached block holds K/V, not the logits of its positions, so they are recomputed.
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None  # structured output: the output must match it (grammar.py)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not self.temperature >= 0:
            raise bad("temperature", ">= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 = off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2] (OpenAI's range)")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0 (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise bad("seed", "a non-negative integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
                raise bad(name, f"an integer in [0, {MAX_LOGPROBS}] or None")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise bad("constraint", "a moekit.infer.grammar.Constraint or None")
        self.logit_bias = {int(t): float(b) for t, b in dict(self.logit_bias).items()}
        if any(t < 0 or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in self.logit_bias.items()):
            raise bad("logit_bias", f"a map of token ids >= 0 to numbers in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


@dataclass
class Logprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # the top-N (token id, logprob), most likely first


@dataclass
class Row:
    """One position to sample: the request's parameters, generator and history (for penalties)."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]  # output before this position, draft tokens already checked included
    masked: bool = False  # its logits go through its row of the step's grammar bitmask (structured output)


def apply_logit_bias(logits_RV: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """OpenAI's logit_bias: each row's biases added to its tokens' logits, one scatter for the batch (out of place)."""
    r_idx, t_idx, vals = [], [], []
    for i, r in enumerate(rows):
        for t, b in r.params.logit_bias.items():
            r_idx.append(i)
            t_idx.append(t)
            vals.append(b)
    if not vals:
        return logits_RV
    dev = logits_RV.device
    index = (torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev))
    return logits_RV.index_put(index, torch.tensor(vals, dtype=logits_RV.dtype, device=dev), accumulate=True)


def apply_penalties(logits_RV: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """vLLM `apply_penalties`: repetition over prompt + output, frequency and presence over the output."""
    if not any(r.params.has_penalties for r in rows):
        return logits_RV
    logits_RV = logits_RV.clone()
    V = logits_RV.shape[-1]
    for i, r in enumerate(rows):
        p = r.params
        if not p.has_penalties:
            continue
        out = torch.tensor(r.output_ids, dtype=torch.long, device=logits_RV.device)
        counts_V = torch.bincount(out, minlength=V)[:V].to(logits_RV.dtype)
        if p.repetition_penalty != 1:
            seen_V = counts_V > 0
            seen_V[torch.tensor(r.prompt_ids, dtype=torch.long, device=logits_RV.device)] = True
            row = logits_RV[i]
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            logits_RV[i] = torch.where(seen_V, penalized, row)
        logits_RV[i] -= p.frequency_penalty * counts_V + p.presence_penalty * (counts_V > 0).to(logits_RV.dtype)
    return logits_RV


def _top_k_top_p(logits_RV: torch.Tensor, k_R: torch.Tensor, p_R: torch.Tensor) -> torch.Tensor:
    """Mask all but the top-k, then all but the smallest set whose probability reaches top_p (vLLM)."""
    V = logits_RV.shape[-1]
    sorted_RV, order_RV = logits_RV.sort(dim=-1)  # ascending
    kth_R1 = sorted_RV.gather(-1, (V - k_R).clamp(0, V - 1)[:, None])
    sorted_RV = sorted_RV.masked_fill(sorted_RV < kth_R1, float("-inf"))
    cum_RV = sorted_RV.softmax(-1).cumsum(-1)
    drop_RV = cum_RV <= 1 - p_R[:, None]
    drop_RV[:, -1] = False  # always keep the most likely token
    sorted_RV = sorted_RV.masked_fill(drop_RV, float("-inf"))
    return torch.empty_like(logits_RV).scatter_(-1, order_RV, sorted_RV)


def target_probs(logits_RV: torch.Tensor, rows: list[Row], bitmask_RW: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution each row samples from (float32), after logit bias, penalties, the grammar mask and every
    truncation. bitmask_RW: the step's packed grammar masks (grammar.new_bitmask), one per row; only the rows
    marked `masked` read theirs.

    Greedy rows get a one-hot on the argmax, so that this is the exact law of `sample`'s output.
    Which steps apply is decided from the parameters on the host: no device sync.
    """
    logits_RV = apply_penalties(apply_logit_bias(logits_RV.float(), rows), rows)
    masked = [i for i, r in enumerate(rows) if r.masked]
    if masked:
        if bitmask_RW is None:
            raise ValueError("rows are marked masked but no grammar bitmask was given")
        logits_RV = apply_bitmask(logits_RV, bitmask_RW, masked)
    dev, V = logits_RV.device, logits_RV.shape[-1]
    if any(not r.params.greedy and r.params.temperature != 1 for r in rows):
        temps = torch.tensor([1.0 if r.params.greedy else r.params.temperature for r in rows], device=dev)
        logits_RV = logits_RV / temps[:, None]
    if any(r.params.min_p > 0 for r in rows):
        probs_RV = logits_RV.softmax(-1)
        min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
        keep_RV = probs_RV >= min_p[:, None] * probs_RV.amax(-1, keepdim=True)
        logits_RV = logits_RV.masked_fill(~keep_RV, float("-inf"))
    if any(0 < r.params.top_k < V or r.params.top_p < 1 for r in rows):
        k_R = torch.tensor([r.params.top_k if 0 < r.params.top_k < V else V for r in rows], device=dev)
        p_R = torch.tensor([r.params.top_p for r in rows], device=dev)
        logits_RV = _top_k_top_p(logits_RV, k_R, p_R)
    probs_RV = logits_RV.softmax(-1)
    if any(r.params.greedy for r in rows):
        greedy_R = torch.tensor([r.params.greedy for r in rows], device=dev)
        onehot_RV = torch.zeros_like(probs_RV).scatter_(-1, logits_RV.argmax(-1, keepdim=True), 1.0)
        probs_RV = torch.where(greedy_R[:, None], onehot_RV, probs_RV)
    return probs_RV


def uniform(generator: torch.Generator | None) -> float:
    """U[0, 1) from the request's own generator (on the CPU, so a seed gives the same draws on any device)."""
    return float(torch.rand((), generator=generator))


def inverse_cdf(probs_RV: torch.Tensor, u_R: list[float]) -> torch.Tensor:
    """Row r's token: the first whose cumulative probability exceeds u_r (in float64, so that even
    tokens of probability ~1e-8 keep their share). A zero-probability token is never chosen."""
    cdf_RV = probs_RV.double().cumsum(-1)
    u_R1 = torch.tensor(u_R, dtype=torch.float64, device=probs_RV.device)[:, None] * cdf_RV[:, -1:]
    return torch.searchsorted(cdf_RV, u_R1, right=True)[:, 0].clamp_(max=probs_RV.shape[-1] - 1)


def draw(probs_V: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(inverse_cdf(probs_V[None], [uniform(generator)])[0])


def choose(probs_RV: torch.Tensor, rows: list[Row]) -> list[int]:
    """One token per row from `target_probs`: the argmax for greedy rows, else one draw, all rows at once
    (one device sync for the batch; the draws come from each row's own generator)."""
    tokens_R = probs_RV.argmax(-1)
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if drawn:
        idx = torch.tensor(drawn, device=probs_RV.device)
        tokens_R[idx] = inverse_cdf(probs_RV[idx], [uniform(rows[i].generator) for i in drawn])
    return tokens_R.tolist()


def sample(logits_RV: torch.Tensor, rows: list[Row]) -> list[int]:
    """One token per row: argmax for greedy rows, else one draw from the row's own generator."""
    return choose(target_probs(logits_RV, rows), rows)


def logprobs(logits_RV: torch.Tensor, tokens: list[int], n_top: list[int]) -> list[Logprob]:
    """The raw log-probability and rank of each chosen token, and each row's top-n alternatives."""
    lp_RV = logits_RV.float().log_softmax(-1)
    tok_R1 = torch.tensor(tokens, device=lp_RV.device)[:, None]
    chosen_R = lp_RV.gather(-1, tok_R1)[:, 0]
    rank_R = (lp_RV > chosen_R[:, None]).sum(-1) + 1
    top_vals, top_ids = lp_RV.topk(max(max(n_top, default=0), 1), dim=-1)
    out = []
    for i, n in enumerate(n_top):
        top = list(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist(), strict=True))
        out.append(Logprob(tokens[i], float(chosen_R[i]), int(rank_R[i]), top))
    return out
