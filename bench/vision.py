"""Vision benchmark: images per second through the encoder, time to first token with and without an image, and
the IO per token of images against text (SPEC section 5: ~600 bytes vs ~4, ~150x). Prints JSON.

    python bench/vision.py                          # the tiny-vision preset, random weights
    python bench/vision.py --model runs/tiny-vision # a trained stage-2 run
    python bench/vision.py --threads 1 --rounds 5

Each figure is the median of --rounds, the baselines measured in the same run: TTFT with an image against the
same prompt without one (the image's cost = the encoder + resampler + cross-attention K/V, once per request),
and the encoder's images/s at batch 1 against larger batches. IO: bytes read per training token of the
rendered scenes (PNG file bytes and decoded pixels per visual token, text bytes per BPE token) and the
planner's figure for gpt4-vision (a 14 x 14 RGB patch per visual token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moekit.infer.engine import Engine
from moekit.infer.sampler import SamplingParams
from moekit.model.transformer import Transformer
from moekit.presets import get_preset


def model_and_encode(path: str | None):
    if path:
        from moekit.infer.loader import load_model

        model, codec = load_model(path)
        return model.eval(), codec.encode
    cfg = get_preset("tiny-vision")
    marker = cfg.vocab_size  # the marker gets a row of its own, as stage 2 adds it
    cfg = cfg.replace(vocab_size=marker + 1, vision={**cfg.to_dict()["vision"], "image_token_id": marker})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.init_weights(0)
    return model, None


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def encoder_rate(model, batch: int, rounds: int) -> float:
    v = model.cfg.vision
    pixels = torch.rand(batch, v.channels, v.image_size, v.image_size) * 2 - 1
    model.encode_images(pixels)  # warm-up
    return batch / median_time(lambda: model.cross_kv(model.encode_images(pixels)), rounds)


def ttft_pair(model, prompt_len: int, rounds: int) -> tuple[float, float]:
    """Median time to first token of one prompt without and with an image, alternated round by round (the
    machine's load changes from second to second; alternating shares it fairly)."""
    v = model.cfg.vision
    ids = [(7 * i + 11) % (model.cfg.vocab_size - 1) + 1 for i in range(prompt_len)]
    ids = [t if t != v.image_token_id else 1 for t in ids]
    with_image = [v.image_token_id] + ids[1:]
    pixels = [torch.rand(v.channels, v.image_size, v.image_size) * 2 - 1]
    engine = Engine(model, None, num_blocks=64, block_size=16, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    runs = {False: lambda: engine.generate([ids], params), True: lambda: engine.generate([with_image], params,
                                                                                         images=[pixels])}
    times = {False: [], True: []}
    for r in range(rounds + 1):
        for key in (False, True) if r % 2 else (True, False):
            t0 = time.perf_counter()
            runs[key]()
            if r:  # round 0 warms up
                times[key].append(time.perf_counter() - t0)
    return statistics.median(times[False]), statistics.median(times[True])


def io_figures(model, encode) -> dict:
    from moekit.plan.vision import vision_plan  # the planner's checked claim
    from moekit.train.image_text import io_stats, scene_examples
    from moekit.train.scenes import SceneConfig

    v = model.cfg.vision
    if encode is None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({"[unk]": 0}, unk_token="[unk]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        encode = lambda s: tok.encode(s).ids  # noqa: E731 (one word per token: a rough stand-in for BPE)
    ex = scene_examples("val", 200, SceneConfig(image_size=v.image_size))
    s = io_stats(ex, encode, v.n_latents, v.image_size)
    io = vision_plan("gpt4-vision").io
    claim = {"bytes_per_visual_token": io.per_visual_token, "text_bytes_per_token": io.text_bytes_per_token,
             "ratio": round(io.ratio, 1), "article_ratio": io.article_ratio, "agrees": io.agrees}
    return {"scenes_text_bytes_per_token": round(s.bytes_per_text_token, 2),
            "scenes_file_bytes_per_visual_token": round(s.file_bytes_per_visual_token, 1),
            "scenes_pixel_bytes_per_visual_token": round(s.pixel_bytes_per_visual_token, 1),
            "scenes_file_ratio": round(s.ratio, 1), "scenes_pixel_ratio": round(s.pixel_ratio, 1),
            "gpt4_vision_planner": claim}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a vision run (default: the tiny-vision preset, random weights)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt-len", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, encode = model_and_encode(args.model)
    rates = {str(b): round(encoder_rate(model, b, args.rounds), 1) for b in (1, 8, 32)}
    t_text, t_img = ttft_pair(model, args.prompt_len, args.rounds)
    print(json.dumps({
        "model": model.cfg.name, "threads": args.threads, "rounds": args.rounds,
        "encoder_images_per_s": rates, "encoder_batch32_vs_batch1": round(rates["32"] / rates["1"], 2),
        "ttft_ms_text": round(1e3 * t_text, 2), "ttft_ms_with_image": round(1e3 * t_img, 2),
        "ttft_image_over_text": round(t_img / t_text, 3), "prompt_len": args.prompt_len,
        "io": io_figures(model, encode),
    }, indent=1))


if __name__ == "__main__":
    main()
