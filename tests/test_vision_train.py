"""`moekit train --init-from RUN --vision` end to end on a small stage-1 run: the run folder it leaves is a
vision run the engine and `moekit generate --image` load; the gates move off 0; with --freeze-lm the text model
is untouched but for the marker's vocabulary row; bad input is one line, exit 2, nothing written.
(The full recipe's accuracy against the text-only model is the CLI's report; the closing note has its figures.)"""

from __future__ import annotations

import json

import pytest
from test_train_cli import FAST, cli, snapshot
from test_train_cli import _cache as _cache  # noqa: F401 (autouse: a private cache and working folder)
from test_train_cli import data as data  # noqa: F401 (fixture)

from moekit.resolve import load_config
from moekit.train.image_text import write_scene_folder
from moekit.train.scenes import SceneConfig

TEXT = ["--n_layer=2", "--d_model=32", "--n_head=2", "--head_dim=16", "--d_ff=64", "--n_expert=4", "--top_k=2",
        "--vocab_size=300", "--max_seq_len=256"]
STAGE2 = ["--steps", "12", "--encoder-steps", "8", "--scenes", "60", "--eval-items", "12", "--log-every", "4",
          "--eval-tokens", "300", "--no-progress"]


@pytest.fixture
def text_run(tmp_path, data, capsys):  # noqa: F811
    out = tmp_path / "text"
    code, _, err = cli(capsys, "train", *TEXT, *FAST, "--batch-tokens", "512", "--data", f"mine={data}:3", "--out",
                       str(out))
    assert code == 0, err
    return out


def test_stage_two_leaves_a_vision_run_whose_gates_moved(text_run, tmp_path, data, capsys):  # noqa: F811
    out = tmp_path / "vision"
    code, stdout, err = cli(capsys, "train", "--init-from", str(text_run), "--vision", *STAGE2, "--data",
                            f"mine={data}:3", "--out", str(out))
    assert code == 0, err
    cfg = load_config(out / "config.json")
    assert cfg.has_vision and cfg.vision.image_token_id >= 0
    tok = json.loads((out / "tokenizer.json").read_text())
    assert any(t["content"] == "<image>" and t["id"] == cfg.vision.image_token_id for t in tok["added_tokens"])
    report = json.loads((out / "vision_report.json").read_text())
    assert report["steps"] == 12
    assert all(abs(g["attn"]) > 1e-4 and abs(g["mlp"]) > 1e-4 for g in report["gates"].values())
    for stage in ("before", "after"):
        assert set(report[stage]["mc"]) == {"val", "heldout"} and report[stage]["text_bpb"] > 0
    assert report["encoder_pretraining"]["steps"] == 8

    picture = tmp_path / "pictures"
    write_scene_folder(picture, "val", 1, SceneConfig(image_size=32))
    png = next((picture / "images").glob("*.png"))
    code, stdout, err = cli(capsys, "generate", "--model", str(out), "--image", str(png), "Q: what colour is it? A:",
                            "--max-tokens", "4", "--temperature", "0")
    assert code == 0, err
    assert "4 tokens" in err or "finish" in err


def test_frozen_lm_keeps_the_text_model(text_run, tmp_path, data, capsys):  # noqa: F811
    out = tmp_path / "frozen"
    code, _, err = cli(capsys, "train", "--init-from", str(text_run), "--vision", "--freeze-lm", *STAGE2, "--data",
                       f"mine={data}:3", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "vision_report.json").read_text())
    # Text rows never reach a gate and the LM is frozen: the one change is the marker's new vocabulary row (this
    # tokenizer fills the 300-token vocabulary), whose logit now takes a little of every softmax.
    assert abs(report["after"]["text_bpb"] - report["before"]["text_bpb"]) < 5e-3


def test_bad_stage_two_input_is_one_line_exit_2_and_nothing_written(text_run, tmp_path, data, capsys):  # noqa: F811
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "captions.jsonl").write_text('{"image": "missing.png", "text": "a cat"}\n')
    cases = [
        ([], "pass --init-from RUN"),
        (["--init-from", str(tmp_path / "nowhere")], "is not a moekit run"),
        (["--init-from", str(text_run), "--scene-objects", "5"], "--scene-objects 5"),
        (["--init-from", str(text_run), "--text-mix", "1.5"], "--text-mix 1.5"),
        (["--init-from", str(text_run), "--nproc", "2"], "one process"),
        (["--init-from", str(text_run), "--data-images", str(tmp_path / "none")], "none"),
        (["--init-from", str(text_run), "--data-images", str(tmp_path / "imgs")], "missing.png"),
    ]
    for argv, message in cases:
        before = snapshot(tmp_path)
        code, _, err = cli(capsys, "train", "--vision", "--steps", "2", "--out", str(tmp_path / "v2"), *argv)
        assert code == 2, (argv, err)
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        after = snapshot(tmp_path)
        assert {k for k in set(before) | set(after) if before.get(k) != after.get(k)
                and not k.startswith("cache")} == set(), argv
    assert not (tmp_path / "v2").exists()
