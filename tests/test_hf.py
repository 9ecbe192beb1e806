"""moekit.hf against transformers: tiny random Llama / Mistral / Mixtral checkpoints saved by transformers
(sharded) load into moekit with equal logits; moekit's saves load back bit for bit and into transformers;
both config.json forms and both expert layouts are read; bad checkpoints fail with a clear message.

transformers is a test-only dependency: it is imported inside the helpers, never by moekit.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import tiny_cfg
from safetensors.torch import load_file, save_file

from moekit.cli import main
from moekit.hf import config_from_hf, config_to_hf, load_hf, parse_size, save_hf
from moekit.model.attention import rope_inv_freq
from moekit.model.transformer import Transformer
from moekit.presets import get_preset
from moekit.resolve import resolve_config

V = 101
TINY = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "initializer_range": 0.1}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# mistralai/Mixtral-8x7B-v0.1 config.json as published on the Hub.
MIXTRAL_8X7B_CONFIG = json.loads("""{
  "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
  "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
  "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
  "output_router_logits": false, "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
  "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0.dev0", "use_cache": true, "vocab_size": 32000
}""")
# meta-llama/Llama-3.1-8B config.json (Hub form: rope_theta and rope_scaling at the top level).
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers model in eval mode, with non-trivial norm weights."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "mixtral": ("MixtralConfig", "MixtralForCausalLM")}
    kw = dict(TINY)
    if kind == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    if kind == "mistral":
        kw.update(sliding_window=None)
    kw.update(overrides)
    config_cls, model_cls = (getattr(transformers, c) for c in classes[kind])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).eval()
    with torch.no_grad():  # norms start at 1; randomize them so that a misplaced norm is caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_hf_model(model, path, max_shard_size="30KB"):
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def assert_same_logits(ref_model, model, lengths=(1, 9, 40), atol=1e-5):
    gen = torch.Generator().manual_seed(1)
    for T in lengths:
        idx = torch.randint(0, V, (2, T), generator=gen)
        with torch.no_grad():
            ref, out = ref_model(idx).logits, model(idx).logits
        assert ref.std() > 0.1  # logits large enough that a wrong weight would show
        assert (out - ref).abs().max().item() <= atol, f"T={T}: max diff {(out - ref).abs().max().item():.2e}"




@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny transformers Mixtral and its sharded checkpoint folder (with a tokenizer.json)."""
    model = hf_model("mixtral")
    path = save_hf_model(model, tmp_path_factory.mktemp("hf") / "tiny-mixtral")
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    return model, path


# ---- logits equal transformers' ----------------------------------------------------------------
@pytest.mark.parametrize("kind, overrides", [
    ("mixtral", {}),  # GQA: 4 query heads, 2 KV heads
    ("mixtral", {"num_key_value_heads": 1, "head_dim": 24}),  # MQA, head_dim != hidden / heads
    ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 1, "tie_word_embeddings": True}),
    ("llama", {}),
    ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("llama", {"head_dim": 32, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e4}}),
    ("llama", {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}}),
    ("mistral", {"num_key_value_heads": 4}),
])
def test_load_hf_matches_transformers(tmp_path, kind, overrides):
    ref = hf_model(kind, **overrides)
    path = save_hf_model(ref, tmp_path / kind)
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2  # really sharded
    model = load_hf(path)
    assert model.cfg.is_moe == (kind == "mixtral") and model.cfg.n_kv_head == ref.config.num_key_value_heads
    assert all(not t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(model.inv_freq, rope_inv_freq(model.cfg))
    if model.cfg.tie_embeddings:  # one Parameter, as in transformers
        assert model.lm_head.weight is model.tok_emb.weight
    assert_same_logits(ref, model)


def test_load_hf_fused_expert_layout(tmp_path, mixtral):
    """transformers 5's in-memory layout (mlp.experts.gate_up_proj / down_proj, mlp.gate) loads identically."""
    ref, path = mixtral
    state = ref.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state  # the fused layout, as transformers 5 holds it
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(path / "config.json", fused)
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    a, b = load_hf(path), load_hf(fused)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert_same_logits(ref, b, lengths=(7,))


def test_load_hf_allocates_no_random_weights(monkeypatch, mixtral):
    """The model is built on the meta device: init_weights never fills real memory before the load."""
    devices = []
    init_weights = Transformer.init_weights

    def spy(self, seed=None):
        devices.append(self.tok_emb.weight.device.type)
        init_weights(self, seed)

    monkeypatch.setattr(Transformer, "init_weights", spy)
    model = load_hf(mixtral[1])
    assert devices == ["meta"] and model.tok_emb.weight.device.type == "cpu"


# ---- config.json -------------------------------------------------------------------------------
def test_mixtral_8x7b_config_is_the_preset():
    cfg = config_from_hf(MIXTRAL_8X7B_CONFIG)
    assert cfg.name == "mixtral"
    assert cfg.replace(name="mixtral-8x7b") == get_preset("mixtral-8x7b")


def test_hub_and_transformers5_config_forms_agree():
    import transformers

    hub = LLAMA31_8B_CONFIG
    v5 = transformers.LlamaConfig(**copy.deepcopy(hub)).to_dict()  # transformers 5's form: rope_parameters
    assert "rope_theta" not in v5 and v5["rope_parameters"]["rope_theta"] == 500000.0
    a, b = config_from_hf(hub), config_from_hf(v5)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling == {**hub["rope_scaling"]}
    assert a.n_kv_head == 8 and a.max_seq_len == 131072 and not a.is_moe
    mix = config_from_hf({**MIXTRAL_8X7B_CONFIG, "rope_theta": None,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert mix == config_from_hf(MIXTRAL_8X7B_CONFIG)
    legacy = config_from_hf({**hub, "rope_scaling": {"type": "linear", "factor": 2.0}})  # pre-4.45 key
    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("cfg", [
    get_preset("mixtral-8x7b"),
    # MQA with a head_dim of its own, every layer MoE, tied, linear RoPE scaling; a dense Llama 3.1-style one.
    tiny_cfg(name="m", vocab_size=V, d_model=64, n_kv_head=1, head_dim=24, moe_every=1, tie_embeddings=True,
             aux_loss_coef=0.05, rope_scaling={"rope_type": "linear", "factor": 4.0}, max_seq_len=2048),
    tiny_cfg(name="d", vocab_size=V, d_model=64, n_expert=1, top_k=1, moe_every=1, rope_theta=5e5,
             rope_scaling=dict(LLAMA3_ROPE), norm_eps=1e-6, max_seq_len=2048),
])
def test_config_to_hf_round_trip(cfg):
    import transformers

    d = config_to_hf(cfg)
    assert config_from_hf(d, name=cfg.name) == cfg
    hf = transformers.AutoConfig.for_model(**d)  # transformers reads it, with the same RoPE
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf.rope_parameters["rope_type"] == (cfg.rope_scaling or {"rope_type": "default"})["rope_type"]


@pytest.mark.parametrize("change, message", [
    ({"mlp": "gelu"}, "mlp='gelu'"),
    ({"norm": "layernorm"}, "norm='layernorm'"),
    ({"moe_every": 2}, "moe_every=2"),
    ({"capacity_factor": 1.25}, "capacity_factor=1.25"),
])
def test_config_to_hf_refuses_what_hf_cannot_hold(change, message):
    cfg = get_preset("mixtral-8x7b").replace(**change)
    with pytest.raises(ValueError, match="cannot be written as a Hugging Face") as e:
        config_to_hf(cfg)
    assert message in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'; moekit reads llama, mistral, mixtral"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"sliding_window": 4096}, "sliding_window=4096 < max_position_embeddings=32768"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
    ({"num_local_experts": None}, "num_local_experts must be a positive integer, got None"),
    ({"num_experts_per_tok": 9}, "top_k (9) cannot exceed n_expert (8)"),
    ({"architectures": ["MixtralForSequenceClassification"]}, "are not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized checkpoints (gptq)"),
])
def test_config_from_hf_errors(change, message):
    with pytest.raises(ValueError) as e:
        config_from_hf({**MIXTRAL_8X7B_CONFIG, **change})
    assert message in str(e.value)


def test_sliding_window_at_least_the_context_is_accepted():
    cfg = config_from_hf({**MIXTRAL_8X7B_CONFIG, "sliding_window": 32768})
    assert cfg.max_seq_len == 32768


# ---- save ----------------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact_and_transformers_reads_it(tmp_path, mixtral):
    import transformers

    ref, path = mixtral
    model = load_hf(path)
    assert model.hf_source.tokenizer == path / "tokenizer.json"
    out = save_hf(model, tmp_path / "out", max_shard_size="40KB", tokenizer=model.hf_source.tokenizer)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]  # the Hub layout
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert (out / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["dtype"] == "float32" and config["bos_token_id"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    again = load_hf(out)
    assert again.cfg == model.cfg.replace(name="out")
    for name, t in model.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name
    reloaded = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    assert_same_logits(ref, reloaded, lengths=(9,), atol=0)


def test_save_tied_llama_and_bf16(tmp_path):
    import transformers

    ref = hf_model("llama", num_key_value_heads=1, tie_word_embeddings=True)
    model = load_hf(save_hf_model(ref, tmp_path / "src"))
    out = save_hf(model, tmp_path / "out")  # one file, no index; the tied lm_head is not written
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    assert_same_logits(ref, transformers.LlamaForCausalLM.from_pretrained(out).eval(), lengths=(9,))

    half = load_hf(save_hf(model, tmp_path / "bf16", dtype=torch.bfloat16), dtype=None)  # dtype from config
    assert half.tok_emb.weight.dtype == torch.bfloat16 and half.lm_head.weight is half.tok_emb.weight
    assert torch.equal(half.blocks["1"].attn.wq.weight, model.blocks["1"].attn.wq.weight.bfloat16())


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500mb") == 5 * 10**8 and parse_size("2GiB") == 2**31
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size '5 gigs' is not a size"):
        parse_size("5 gigs")


def test_save_native_moekit_model(tmp_path):
    cfg = tiny_cfg(name="native", vocab_size=V, n_kv_head=1, d_ff=16, moe_every=1, max_seq_len=2048)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    again = load_hf(save_hf(model, tmp_path / "native"))
    for name, t in model.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name
    with pytest.raises(ValueError, match="mlp='gelu'"):
        save_hf(Transformer(get_preset("tiny").replace(n_layer=1)), tmp_path / "gelu")
    assert not (tmp_path / "gelu").exists()


def test_save_never_destroys_an_existing_folder(tmp_path, monkeypatch, mixtral):
    import moekit.hf

    model = load_hf(mixtral[1])
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty; choose a new folder or pass overwrite=True"):
        save_hf(model, target)

    calls = []

    def failing_save_file(tensors, filename, metadata=None):  # the disk fills up on the 3rd shard
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("No space left on device")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(moekit.hf, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_hf(model, target, max_shard_size="40KB", overwrite=True)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # temporary folder removed
    monkeypatch.undo()
    save_hf(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- bad checkpoints -----------------------------------------------------------------------------
def broken_copy(tmp_path, mixtral):
    path = tmp_path / "broken"
    shutil.copytree(mixtral[1], path)
    return path


def edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, **changes}))


def shard_of(path, name):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_missing_folder_config_and_weights(tmp_path, mixtral):
    with pytest.raises(FileNotFoundError, match="folder .*nowhere does not exist"):
        load_hf(tmp_path / "nowhere")
    path = broken_copy(tmp_path, mixtral)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf(path)

    path = tmp_path / "noweights"
    path.mkdir()
    shutil.copy(mixtral[1] / "config.json", path)
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json.*pickle"):
        load_hf(path)


def test_missing_shard(tmp_path, mixtral):
    path = broken_copy(tmp_path, mixtral)
    shard = shard_of(path, "model.layers.1.block_sparse_moe.experts.2.w1.weight")
    (path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard\\(s\\) missing from .*: {shard}; the download"):
        load_hf(path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_unsupported_config_in_folder(tmp_path, mixtral, change, message):
    path = broken_copy(tmp_path, mixtral)
    edit_config(path, **change)
    with pytest.raises(ValueError, match=message):
        load_hf(path)


def rewrite_tensor(path, name, new):
    """Replace (or, with new=None, remove) tensor `name` in its shard, keeping the index consistent."""
    shard = shard_of(path, name)
    tensors = load_file(str(path / shard))
    if new is None:
        del tensors[name]
        index = json.loads((path / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = new
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    return shard


def test_wrong_shape(tmp_path, mixtral):
    path = broken_copy(tmp_path, mixtral)
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = rewrite_tensor(path, name, torch.zeros(64, 64))
    with pytest.raises(ValueError) as e:
        load_hf(path)
    assert f"tensor {name} in {shard} has shape (64, 64), expected (32, 64)" in str(e.value)


def test_missing_and_unexpected_tensors(tmp_path, mixtral):
    path = broken_copy(tmp_path, mixtral)
    name = "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    rewrite_tensor(path, name, None)
    with pytest.raises(ValueError, match=f"tensor\\(s\\) {name} missing from the weights that config.json"):
        load_hf(path)

    path = tmp_path / "extra"
    shutil.copytree(mixtral[1], path)
    edit_config(path, num_local_experts=3)  # the checkpoint has a 4th expert the config does not
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.block_sparse_moe.experts.3.w1.weight in "
                                         "model-.*safetensors .and 5 more.*3 experts"):
        load_hf(path)


def test_shard_not_holding_what_the_index_says(tmp_path, mixtral):
    path = broken_copy(tmp_path, mixtral)
    name = "model.norm.weight"
    shard = shard_of(path, name)
    rewrite_tensor(path, name, None)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = shard  # the index still lists it
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"the index says {name} is in {shard}, which does not hold it"):
        load_hf(path)


# ---- the CLI -------------------------------------------------------------------------------------
def test_moekit_info_on_a_hf_folder(capsys, mixtral):
    ref, path = mixtral
    assert main(["info", str(path), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["config"]["n_expert"] == 4 and card["config"]["top_k"] == 2
    assert card["params"]["total"] == sum(p.numel() for p in ref.parameters())
    assert main(["info", str(path)]) == 0
    assert "4 experts, top-2" in capsys.readouterr().out
    assert resolve_config(str(path)).n_kv_head == 2


def test_moekit_info_bad_hf_folder(tmp_path, capsys, mixtral):
    path = broken_copy(tmp_path, mixtral)
    edit_config(path, hidden_act="gelu")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "hidden_act 'gelu' is not supported" in err and len(err.strip().splitlines()) == 1
