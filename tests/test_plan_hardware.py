"""The hardware table, user hardware files and `moekit bench hardware` (issue 3, Build 1).

Assumptions: the table holds datasheet figures, dense (no 2:4 sparsity), and SPEC section 6 is
the reference for A100/H100/H200. Measured speeds are never asserted (the machine is shared); a
tiny `--quick` run only checks that the file it writes round-trips through the planner.
"""

import json

import pytest

from moekit.cli import main
from moekit.plan.hardware import GPU, TABLE, get_gpu, known_gpus, load_hardware_file


@pytest.fixture(autouse=True)
def _no_local_cache(tmp_path, monkeypatch):
    # `local` lives under XDG_CACHE_HOME: point it at an empty folder so no test sees this machine's.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_table_matches_spec_section_6():
    # SPEC 6: A100 40GB 312 TFLOP/s, 1.555 TB/s; A100 80GB 312, 2.0 TB/s; H100 SXM 989 (FP8 1,979),
    # 3.35 TB/s, 80 GB; H200 989, 4.8 TB/s, 141 GB.
    expect = {"A100-40GB": (312, 1555, 40), "A100-80GB": (312, 2039, 80), "H100": (989, 3350, 80),
              "H200": (989, 4800, 141)}
    for name, (bf16, bw, mem) in expect.items():
        g = get_gpu(name)
        assert g.tflops["bf16"] == bf16 and g.hbm_gb_s == bw and g.memory_gb == mem
    assert get_gpu("H100").tflops["fp8"] == 1979
    assert not get_gpu("A100-40GB").supports("fp8")  # Ampere has no FP8 tensor cores
    for name in ("B200", "MI300X"):  # the other two: every entry has the fields the planner uses
        g = get_gpu(name)
        assert g.tflops["fp8"] == pytest.approx(2 * g.tflops["bf16"], rel=1e-3)
        assert g.nvlink_gb_s > 0 and g.internode_gb_s > 0
    assert set(TABLE) >= {"A100-40GB", "A100-80GB", "H100", "H200", "B200", "MI300X"}


def test_names_are_forgiving_and_copies_are_independent():
    assert get_gpu("h100").name == get_gpu("H100 SXM").name == "H100"
    assert get_gpu("a100_40gb").name == "A100-40GB"
    g = get_gpu("H100")
    g.tflops["bf16"] = 1.0
    assert get_gpu("H100").tflops["bf16"] == 989  # callers cannot corrupt the table


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown GPU 'V100'; known: A100-40GB, A100-80GB, H100"):
        get_gpu("V100")


def test_units():
    g = get_gpu("H100")
    assert g.bandwidth == 3.35e12 and g.memory_bytes == 80e9 and g.peak_flops("fp16") == 989e12
    # Without a measured GEMV figure, decode reads weights at 80% of the datasheet bandwidth (the planner's
    # serving assumption, stated in test_plan_serve.py and in the report's SCENARIO).
    assert g.weight_read_bandwidth("bf16") == pytest.approx(0.8 * 3.35e12)
    with pytest.raises(ValueError, match="A100-40GB has no fp8 peak"):
        get_gpu("A100-40GB").peak_flops("fp8")


def test_toml_and_json_files_round_trip(tmp_path):
    toml = tmp_path / "gpus.toml"
    toml.write_text('[[gpus]]\nname = "L40S"\nmemory_gb = 48\nhbm_gb_s = 864\nprice_per_hour = 1.1\n'
                    '[gpus.tflops]\nbf16 = 362\nfp8 = 733\n\n'
                    '[[gpus]]\nname = "toy"\nmemory_gb = 1\nhbm_gb_s = 1\ntflops = {bf16 = 1}\n')
    l40s = get_gpu("L40S", files=[toml])
    assert (l40s.memory_gb, l40s.hbm_gb_s, l40s.price_per_hour) == (48, 864, 1.1)
    assert l40s.tflops == {"bf16": 362, "fp8": 733}
    assert set(known_gpus([toml])) >= {"L40S", "toy", "H100"}
    single = tmp_path / "one.json"
    single.write_text(json.dumps(get_gpu("H200").to_dict()))
    assert get_gpu(str(single)) == get_gpu("H200")  # a file with one GPU can be named by its path
    with pytest.raises(ValueError, match="holds 2 GPUs"):
        get_gpu(str(toml))


@pytest.mark.parametrize("text, message", [
    ('{"name": "x", "memory_gb": 1, "hbm_gb_s": 1}', "missing field"),
    ('{"name": "x", "memory_gb": 1, "hbm_gb_s": 1, "tflops": {"bf16": 1}, "hbm": 2}', "unknown field"),
    ('{"name": "x", "memory_gb": -1, "hbm_gb_s": 1, "tflops": {"bf16": 1}}', "memory_gb must be a positive"),
    ('{"name": "x", "memory_gb": 1, "hbm_gb_s": 1, "tflops": {"fp9": 1, "bf16": 1}}', "unknown dtype 'fp9'"),
    ('{"name": "x", "memory_gb": 1, "hbm_gb_s": 1, "tflops": {"bf16": 1}, "flops_efficiency": 2}',
     r"\(0, 1\]"),
    ('{"name": "x", "memory_gb": 1, "hbm_gb_s": 1, "tflops": {"bf16": 1}, "layer_overhead_us": -3}',
     "layer_overhead_us must be a number >= 0"),
    ('{"name": "x", "memory_gb": 1, "hbm_gb_s": 1, "tflops": {"bf16": 1}, "batched_gemv_gb_s": {"fp32": {"1": 3}}}',
     "must map token counts > 1"),
    ('{"name": "x", "memory_gb": 1, "hbm_gb_s": 1, "tflops": {"bf16": 1}, "batched_gemv_gb_s": {"fp32": {"8": 0}}}',
     r"batched_gemv_gb_s.fp32.8 must be a positive number"),
    ('{"name": "x", "memory_gb": 1, "hbm_gb_s": 1, "tflops": {"bf16": 1}, "overhead_by_dtype": {"int8": {"layer": 1}}}',
     "must have exactly the keys layer, step, expert, seq"),
    ('{"name": "x", "memory_gb": 1, "hbm_gb_s": 1, "tflops": {"bf16": 1}, "overhead_by_dtype": '
     '{"int8": {"layer": 1, "step": 1, "expert": -1, "seq": 0}}}',
     "overhead_by_dtype.int8.expert must be a number >= 0"),
    ("{not json", "is not valid JSON"),
])
def test_bad_hardware_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_hardware_file(path)


def test_missing_file_and_missing_local():
    with pytest.raises(FileNotFoundError):
        load_hardware_file("/nonexistent/gpus.json")
    with pytest.raises(ValueError, match="run `moekit bench hardware`"):
        get_gpu("local")


def test_bench_hardware_writes_the_table_format(tmp_path, capsys):
    # Tiny sizes: this checks the file format and the plumbing into the planner, not the machine.
    out = tmp_path / "cache" / "moekit" / "hardware.json"  # where `--gpu local` looks (fixture above)
    assert main(["bench", "hardware", "--device", "cpu", "--quick"]) == 0
    printed = json.loads(capsys.readouterr().out)
    entry = load_hardware_file(out)[0]
    assert entry.to_dict() == printed["hardware"] and printed["written"] == str(out)
    assert set(entry.tflops) == {"fp32", "bf16"} and set(entry.gemv_gb_s) == {"fp32", "bf16", "int8"}
    assert set(entry.batched_gemv_gb_s) == {"fp32", "bf16", "int8"}
    assert all(set(t) == {"16"} for t in entry.batched_gemv_gb_s.values())
    assert entry.bandwidth_efficiency == entry.flops_efficiency == 1.0  # measured = achieved
    # moekit's own engine: a decode step of 8 narrow layers costs more than one of 2, per weight format; the scalar
    # fields are the CPU's default format's (fp32).
    assert set(entry.overhead_by_dtype) == {"fp32", "bf16", "int8"}
    assert all(o["layer"] > 0 and min(o.values()) >= 0 for o in entry.overhead_by_dtype.values())
    fp32 = entry.overhead_by_dtype["fp32"]
    assert (entry.layer_overhead_us, entry.step_overhead_us, entry.expert_overhead_us, entry.seq_overhead_us) == (
        fp32["layer"], fp32["step"], fp32["expert"], fp32["seq"])
    assert "tiny's shapes" in entry.source
    # Training figures at tiny's shapes (fp32 always; bf16 only where the CPU has bf16 units).
    assert "fp32" in entry.gemm_tflops_at and set(entry.attention_tflops["fp32"]) == {"fwd", "bwd"}
    assert entry.elementwise_gb_s > 0
    assert all(g.layer_overhead_us == g.step_overhead_us == 0 for g in TABLE.values())  # datasheet entries
    assert not list(out.parent.glob("*.tmp"))  # atomic write left no temporary file
    local = get_gpu("local")
    assert local.name == "local" and local.hbm_gb_s == entry.hbm_gb_s
    # The planner uses the measured GEMV figure for weight reads and the stream figure for the rest.
    assert local.weight_read_bandwidth("bf16") == entry.gemv_gb_s["bf16"] * 1e9
    assert local.weight_read_bandwidth("int8", 16) == pytest.approx(entry.batched_gemv_gb_s["int8"]["16"] * 1e9)
    assert local.weight_read_bandwidth("fp8") == entry.hbm_gb_s * 1e9  # a format it did not time: the stream
    assert main(["plan", "serve", "--model", "tiny", "--gpu", "local", "--tp", "1", "--pp", "1",
                 "--batch", "4", "--price-per-hour", "0.5"]) == 0
    assert "serving tiny on 1 x local" in capsys.readouterr().out


def test_bench_needs_a_benchmark(capsys):
    assert main(["bench"]) == 2
    assert "choose a benchmark: moekit bench {hardware,serve}" in capsys.readouterr().err
    assert main(["bench", "hardware", "--out", "/"]) == 2  # a directory, not a file


@pytest.mark.gpu
def test_bench_hardware_on_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from moekit.bench_hardware import measure

    entry = measure("cuda", quick=True)
    assert isinstance(entry, GPU) and entry.memory_gb > 1 and entry.gpus_per_node >= 1


def test_measured_read_bandwidth_by_tokens_and_overheads_by_format():
    """Weight reads at 1 token take gemv_gb_s, at more the batched figures, log-interpolated between two points and
    held past the last; overheads come per weight format, the scalar fields for a format not listed."""
    g = GPU(name="m", memory_gb=1, hbm_gb_s=20, tflops={"bf16": 1}, bandwidth_efficiency=1.0,
            gemv_gb_s={"fp32": 12.0}, batched_gemv_gb_s={"fp32": {"16": 6.0, "64": 4.0}},
            layer_overhead_us=5, step_overhead_us=6, expert_overhead_us=7, seq_overhead_us=8,
            overhead_by_dtype={"int8": {"layer": 1, "step": 2, "expert": 3, "seq": 4}})
    assert g.weight_read_bandwidth("fp32") == g.weight_read_bandwidth("fp32", 0.5) == 12e9
    assert g.weight_read_bandwidth("fp32", 4) == pytest.approx(9e9)  # halfway on log2: 1 -> 16
    assert g.weight_read_bandwidth("fp32", 16) == pytest.approx(6e9)
    assert g.weight_read_bandwidth("fp32", 32) == pytest.approx(5e9)
    assert g.weight_read_bandwidth("fp32", 4096) == pytest.approx(4e9)
    assert g.weight_read_bandwidth("bf16", 16) == 20e9  # not measured: the stream x efficiency
    assert g.overheads("int8") == (1, 2, 3, 4) and g.overheads("fp32") == (5, 6, 7, 8)
    assert GPU.from_dict(json.loads(json.dumps(g.to_dict()))) == g  # the file format round-trips

