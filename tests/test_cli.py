"""`moekit info` and the CLI's handling of bad input: one line, exit code 2, no traceback."""

import json
import subprocess
import sys

import pytest
from conftest import tiny_cfg

from moekit.cli import main
from moekit.resolve import save_config


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_gpt4_prints_the_counts(capsys):
    code, out, _ = run_cli(capsys, "info", "gpt4")
    assert code == 0
    assert "1.83T" in out and "279.96B" in out and "110.98B" in out and "55.82B" in out
    assert "557.77GFLOP" in out
    assert "61.44kB" in out and "10.32MB" in out  # MQA vs MHA KV bytes per token


def test_info_json_and_overrides(capsys):
    code, out, _ = run_cli(capsys, "info", "tiny", "--json", "--n_layer=2", "--top_k=1")
    card = json.loads(out)
    assert code == 0 and card["config"]["n_layer"] == 2 and card["config"]["top_k"] == 1
    assert card["params"]["total"] > card["params"]["active"]


def test_info_reads_a_config_file(tmp_path, capsys):
    save_config(tiny_cfg(name="mine", n_layer=3), tmp_path / "config.json")
    code, out, _ = run_cli(capsys, "info", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["config"]["n_layer"] == 3


@pytest.mark.parametrize("argv, message", [
    (["info", "gpt5"], "neither a preset"),
    (["info", "tiny", "--n_layerz=3"], "unknown config key 'n_layerz'"),
    (["info", "tiny", "--top_k=9"], "top_k (9) cannot exceed n_expert (8)"),
    (["info", "tiny", "--n_head=3"], "n_head (3) must divide d_model (128)"),
    (["info", "tiny", "--n_layer=two"], "--n_layer=two: expected a value of type int"),
    (["info", "tiny", "--n_layer=0"], "n_layer must be a positive integer"),
    (["info", "tiny", "--mlp=relu"], "mlp must be one of"),
    (["info", "tiny", "--n_kv_head=3"], "n_kv_head (3) must divide n_head (4)"),
    (["info", "tiny", "--capacity_factor=-1"], "capacity_factor must be >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_config_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert code == 2 and "is not valid JSON" in err
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2, "n_experts": 4}))
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert code == 2 and "unknown ModelConfig field(s) ['n_experts']" in err


def test_console_script_exit_code_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "moekit.cli", "info", "tiny", "--top_k=99"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "moekit: error: top_k (99) cannot exceed n_expert (8)"
