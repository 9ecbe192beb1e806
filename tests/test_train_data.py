"""Training data: sources and their split, the BPE tokenizer, the token cache, packing, the epoch mixture."""

import json
import math

import numpy as np
import pytest

from moekit.train import corpus
from moekit.train.corpus import Source, docstring_document, parse_data_spec, resolve_sources
from moekit.train.data import Mixture, PackedSource, tokenize_cached, val_windows
from moekit.train.tokenizer import EOT, load_tokenizer, token_bytes, tokenizer_hash, train_bpe

TEXTS = [
    "The router sends every token to two of sixteen experts.\n",
    "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n",
    "Ünïcödé, emoji 😀 and tabs\tand CRLF\r\n and  double  spaces.",
    "",
    "   leading spaces and trailing newlines\n\n\n",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


def write_corpus(root, n_files=6, lines=40):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # doc {j}\n" for j in range(lines))
        (root / f"m{i}.py").write_text(body)
    return root


@pytest.fixture(scope="module")
def tok():
    docs = [t * 20 for t in TEXTS] + [f"def f{i}(x):\n    return x + {i}\n" * 5 for i in range(50)]
    return train_bpe(docs, 300)


# ---- sources ---------------------------------------------------------------------------------------
def test_data_spec_parsing(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    s = parse_data_spec(f"mine={tmp_path}/a.txt:2.5")
    assert (s.name, s.epochs, s.path) == ("mine", 2.5, str((tmp_path / "a.txt").resolve()))
    assert parse_data_spec(f"x={tmp_path}").epochs == 1.0
    assert parse_data_spec("code=@stdlib-code:4").path == corpus.STDLIB_CODE
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_data_spec(f"x={tmp_path}/missing:2")
    for bad in ("nopath", "=x", f"x={tmp_path}:0", f"x={tmp_path}:-1", f"bad name={tmp_path}"):
        with pytest.raises(ValueError):
            parse_data_spec(bad)
    with pytest.raises(ValueError, match="unique"):
        resolve_sources([f"a={tmp_path}", f"a={tmp_path}:2"])
    assert [(s.name, s.epochs) for s in resolve_sources([])] == [("text", 2.0), ("code", 4.0)]  # GPT-4's epochs


def test_split_by_file_is_deterministic_disjoint_and_complete(tmp_path):
    root = write_corpus(tmp_path / "c", n_files=30, lines=2)
    src = Source("c", str(root), 1.0)
    train, val = src.documents("train", 0.2), src.documents("val", 0.2)
    everything = sorted(p.read_text() for p in root.glob("*.py"))
    assert sorted(train + val) == everything and not set(train) & set(val)
    assert 1 <= len(val) < len(everything)
    assert src.documents("val", 0.2) == val  # same split every time
    # The split depends on the file's key only: adding files does not move the existing ones.
    (root / "zz_new.py").write_text("x = 1\n")
    assert set(val) <= set(Source("c", str(root), 1.0).documents("val", 0.2)) | {"x = 1\n"}


def test_single_file_sources_are_split_by_row_or_by_tail(tmp_path):
    rows = [{"text": f"row {i} " * 5} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    src = Source("j", str(tmp_path / "d.jsonl"), 1.0)
    train, val = src.documents("train", 0.1), src.documents("val", 0.1)
    assert sorted(train + val) == sorted(r["text"] for r in rows) and val and train
    (tmp_path / "one.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    one = Source("t", str(tmp_path / "one.txt"), 1.0)
    t, v = one.documents("train", 0.1), one.documents("val", 0.1)
    assert t[0] + v[0] == (tmp_path / "one.txt").read_text() and v[0].startswith("line 9")


def test_bad_sources_name_the_problem(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string 'text' field"):
        Source("j", str(tmp_path / "bad.jsonl"), 1.0).documents("train", 0.1)
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        Source("j", str(tmp_path / "broken.jsonl"), 1.0).documents("train", 0.1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        Source("e", str(empty), 1.0).documents("train", 0.1)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="no .txt"):
        Source("n", str(tmp_path / "none"), 1.0).files()


def test_docstrings_come_from_ast_with_qualified_names():
    src = '"""Module doc."""\nclass A:\n    """Class doc."""\n    def m(self, x=1):\n        """Method doc."""\n'
    doc = docstring_document(src, "pkg.mod")
    assert doc == ("Module pkg.mod\n\nModule doc.\n\n\nclass pkg.mod.A\n\nClass doc.\n\n\n"
                   "pkg.mod.A.m(self, x=1)\n\nMethod doc.")
    assert docstring_document("def broken(:\n", "m") == ""


def test_embedded_corpus_lists_stdlib_without_tests_and_holds_out_the_same_files():
    files = corpus.stdlib_files()
    assert "json/__init__.py" in files and "argparse.py" in files
    assert not any(f.startswith(("test/", "encodings/", "site-packages/")) for f in files)
    topics = corpus.pydoc_topics()
    assert "assignment" in topics and len(topics) > 50  # the language reference, parsed not imported
    # A held-out file is held out of both sources (its code and its docstrings).
    val_files = {f for f in files if corpus.held_out(f, 0.05)}
    assert 0 < len(val_files) < len(files) * 0.15


# ---- tokenizer -------------------------------------------------------------------------------------
def test_tokenizer_round_trips_any_text(tok):
    assert tok.token_to_id(EOT) == 0 and tok.get_vocab_size() <= 300
    for text in TEXTS + ["\x00\x01 bytes", "中文字符", "a" * 1000, "\n".join(TEXTS)]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_token_bytes_count_utf8_bytes_exactly(tok):
    tb = token_bytes(tok)
    assert tb[0] == 0  # <|endoftext|> spells no bytes
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tb[ids].sum() == len(text.encode("utf-8"))


def test_tokenizer_json_loads_in_hugging_face_and_training_is_deterministic(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    again = load_tokenizer(path)
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    docs = [t * 20 for t in TEXTS] + [f"def f{i}(x):\n    return x + {i}\n" * 5 for i in range(50)]
    assert train_bpe(docs, 300).to_str() == tok.to_str()
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in TEXTS[:3]:
        assert hf.encode(text) == tok.encode(text).ids and hf.decode(hf.encode(text)) == text
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


# ---- token cache and packing ---------------------------------------------------------------------------
def test_token_cache_is_written_once_and_memory_mapped(tok, tmp_path):
    root = write_corpus(tmp_path / "c", n_files=4)
    src = Source("c", str(root), 1.0)
    th = tokenizer_hash(tok)
    tokens = tokenize_cached(src, "train", 0.2, tok, th, progress=False)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    docs = src.documents("train", 0.2)
    expected = [i for d in docs for i in [0] + tok.encode(d, add_special_tokens=False).ids]
    assert tokens.tolist() == expected  # EOT before every document
    bins = list((tmp_path / "cache" / "tokens").glob("*.bin"))
    mtime = bins[0].stat().st_mtime_ns
    again = tokenize_cached(src, "train", 0.2, tok, th, progress=False)
    assert again.tolist() == expected and bins[0].stat().st_mtime_ns == mtime  # read, not rewritten


def test_packing_windows_and_validation_windows():
    tokens = np.arange(101, dtype=np.uint16)
    p = PackedSource("s", 1.0, tokens, seq_len=10)
    assert p.n_seqs == 10
    assert p.window(0).tolist() == list(range(11)) and p.window(9).tolist() == list(range(90, 101))
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedSource("s", 1.0, np.arange(5, dtype=np.uint16), seq_len=10)
    w = val_windows(np.arange(25), seq_len=10, max_tokens=1000)
    assert [x.tolist()[0] for x in w] == [0, 10, 20] and len(w[-1]) == 5
    assert len(val_windows(np.arange(1000), 10, max_tokens=50)) == 5
    assert val_windows(np.arange(4), 10, 100)[0].tolist() == [0, 1, 2, 3]  # shorter than a window: used whole


# ---- the epoch-weighted mixture ---------------------------------------------------------------------------
def make_mixture(seed=0):
    # Tokens 0, 1, 2, ...: window j of a source (seq_len 10) starts with token 10 j, so a batch says which it is.
    text = PackedSource("text", 2.0, np.arange(3000, dtype=np.uint16), 10)  # 299 windows x 2 epochs
    code = PackedSource("code", 4.0, np.arange(5000, dtype=np.uint16), 10)  # 499 windows x 4 epochs
    return Mixture([text, code], seed)


def test_mixture_follows_tokens_times_epochs_within_sampling_error():
    m = make_mixture()
    p_text = 299 * 2 / (299 * 2 + 499 * 4)
    assert m.probs[0] == pytest.approx(p_text)
    n = 2000
    _, _, which = m.next_batch(n)
    count = which.count(0)
    sigma = math.sqrt(n * p_text * (1 - p_text))
    assert abs(count - n * p_text) < 4 * sigma, (count, n * p_text, sigma)
    assert m.tokens_seen() == {"text": count * 10, "code": (n - count) * 10}


def test_mixture_sees_every_window_once_per_epoch():
    m = make_mixture()
    seen = {0: [], 1: []}
    x, _, which = m.next_batch(3000)
    for first, s in zip(x[:, 0].tolist(), which, strict=True):
        seen[s].append(first // 10)  # the window's index in its source
    for s, n in ((0, 299), (1, 499)):
        full = len(seen[s]) // n
        assert full >= 1
        for e in range(full):
            assert sorted(seen[s][e * n:(e + 1) * n]) == list(range(n))
        assert seen[s][:n] != seen[s][n:2 * n] or full < 2  # a fresh order each epoch


def test_mixture_is_deterministic_and_restores_its_position():
    a, b = make_mixture(seed=3), make_mixture(seed=3)
    a.next_batch(37)
    state = json.loads(json.dumps(a.state_dict()))  # it lives in a JSON checkpoint
    b.load_state_dict(state)
    xa, ya, wa = a.next_batch(50)
    xb, yb, wb = b.next_batch(50)
    assert wa == wb and (xa == xb).all() and (ya == yb).all()
    assert (ya[:, :-1] == xa[:, 1:]).all()  # targets are the inputs shifted by one
    other = make_mixture(seed=4)
    other.next_batch(37)
    assert other.next_batch(50)[2] != wa
    with pytest.raises(ValueError, match="data sources"):
        b.load_state_dict({"next_seq": 0, "taken": {"text": 0, "other": 0}})
