"""`moekit generate`: standard output is exactly the generated text; bad input is one line and exit 2."""

import pytest
import torch
from conftest import CHARS, char_tokenizer, greedy_reference, save_run, tiny_model
from tokenizers import Tokenizer, models

from moekit.cli import main
from moekit.infer.loader import load_model


def write_run(folder, seed=0, tokenizer=None, checkpoint_step=None):
    """A run folder of the tiny model (31 tokens: the character tokenizer's), tied embeddings; the model."""
    model = tiny_model(seed, vocab_size=31, tie_embeddings=True)
    save_run(folder, model, tokenizer or char_tokenizer(), checkpoint_step)
    return model


def run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def expected_text(model, prompt, n):
    tok = char_tokenizer()
    ids = [0] + tok.encode(prompt, add_special_tokens=False).ids  # a run's documents start with <|endoftext|>
    return tok.decode(greedy_reference(model, ids, n, eos=0), skip_special_tokens=True)


@pytest.mark.parametrize("extra", [[], ["--draft", "RUN"], ["--ngram", "--num-spec-tokens", "2"]])
def test_generate_streams_only_the_text_to_stdout(tmp_path, capsys, extra):
    model = write_run(tmp_path / "run")
    extra = [str(tmp_path / "run") if a == "RUN" else a for a in extra]
    code, out, err = run(capsys, "--model", str(tmp_path / "run"), "the cat", "--temperature", "0",
                         "--max-tokens", "12", "--kv-cache-gb", "0.001", *extra)
    assert code == 0, err
    assert out == expected_text(model, "the cat", 12) + "\n"
    assert "tokens in" in err and "tok/s" in err
    if "--draft" in extra:
        assert "speculative" in err and "drafts accepted" in err


def test_generate_int8_and_newest_good_checkpoint(tmp_path, capsys):
    model = write_run(tmp_path / "run", checkpoint_step=10)
    broken = tmp_path / "run" / "checkpoints" / "step_00000020"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"truncated")
    loaded, codec = load_model(tmp_path / "run")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight) and loaded.lm_head.weight is loaded.tok_emb.weight
    assert codec.encode("ab") == [0, 1, 2] and codec.eos_token_ids == (0,)
    code, out, err = run(capsys, "--model", str(tmp_path / "run"), "abc", "--quantize", "int8", "--seed", "1",
                         "--max-tokens", "5")
    assert code == 0 and "int8" in err and len(out) <= 6


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--kv-cache-gb", "0"], "--kv-cache-gb must be > 0"),
    (["--draft", "RUN", "--ngram"], "choose one"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    write_run(tmp_path / "run")
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    code, out, err = run(capsys, "--model", str(tmp_path / "run"), "hi", *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_models_and_prompts_are_one_line_and_exit_2(tmp_path, capsys):
    write_run(tmp_path / "run")
    other = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(["<|endoftext|>"] + CHARS[::-1])}, merges=[]))
    other.add_special_tokens(["<|endoftext|>"])  # the same size, another vocabulary
    write_run(tmp_path / "other", seed=1, tokenizer=other)
    (tmp_path / "empty").mkdir()
    cases = [
        (["--model", str(tmp_path / "missing"), "hi"], "missing does not exist"),
        (["--model", str(tmp_path / "empty"), "hi"], "has no config.json"),
        (["--model", str(tmp_path / "run"), "a" * 300], "shorten the prompt"),
        (["--model", str(tmp_path / "run"), "hi", "--draft", str(tmp_path / "other")], "does not use the tokenizer"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "", argv
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_generate_from_a_hugging_face_folder(tmp_path, capsys):
    from moekit.hf import save_hf

    model = tiny_model(3, vocab_size=31, moe_every=1)
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    save_hf(model, tmp_path / "hf", tokenizer=tmp_path / "tokenizer.json")
    code, out, err = run(capsys, "--model", str(tmp_path / "hf"), "the cat", "--temperature", "0", "--max-tokens", "9")
    assert code == 0, err
    ids = char_tokenizer().encode("the cat", add_special_tokens=False).ids  # no BOS in this config
    # config.json names no eos token: the tokenizer's <|endoftext|> (id 0) ends the text
    want = char_tokenizer().decode(greedy_reference(model, ids, 9, eos=0), skip_special_tokens=True)
    assert out == want + "\n"


def test_auto_dtype_is_fp32_on_a_cpu_except_int8_on_bf16_units():
    from moekit.util import cpu_has_bf16, resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", cpu, "int8") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert resolve_dtype("float32", cpu, "int8") == torch.float32 and resolve_dtype("float16", cpu) == torch.float16
