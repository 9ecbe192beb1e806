"""Training documents: the embedded standard-library corpus and user sources, split by file.

GPT-4 trained on a mixture counted in epochs: 2 of text, 4 of code (SPEC section 3). moekit's
embedded default has the same two kinds and downloads nothing (DESIGN.md, "Offline"):

- `text` (2 epochs): English documentation of the running Python: the `pydoc_data` topics (the
  language reference) and the docstrings of every standard-library module, class and function.
  Docstrings are read by parsing the .py files with `ast`; no module is imported.
- `code` (4 epochs): the standard library's .py files (tests, encodings tables and site-packages
  excluded).

User sources come from `--data NAME=PATH[:EPOCHS]`: a file or folder of .txt, .md, .py or .jsonl
(one JSON object per line with a string `text` field). Train and validation are split by file,
deterministically, from a hash of the file's path; a held-out stdlib file is held out of both the
code and the text source. A source of a single file is split by its rows (.jsonl) or by its tail.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

FORMAT_VERSION = "corpus-v1"  # bump when document extraction changes: it invalidates the caches
SUFFIXES = (".txt", ".md", ".py", ".jsonl")
STDLIB_TEXT, STDLIB_CODE = "@stdlib-text", "@stdlib-code"
DEFAULT_SPECS = (f"text={STDLIB_TEXT}:2", f"code={STDLIB_CODE}:4")  # GPT-4: 2 epochs text, 4 code
# Not training data: test suites, generated codec tables, third-party packages, the topics literal.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
                "pydoc_data", "__phello__"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def stdlib_files() -> tuple[str, ...]:
    """Standard-library .py files (relative paths, sorted) that make up the embedded corpus."""
    root = stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not any(part in _STDLIB_SKIP or part.startswith(".") for part in rel.parts[:-1]):
            out.append(rel.as_posix())
    return tuple(sorted(out))


def held_out(key: str, val_fraction: float) -> bool:
    """Deterministic, stable split: a unit is validation when the hash of its key falls below the fraction."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _split_units(keys: list[str], val_fraction: float) -> set[str]:
    """The validation keys, never all and (with 2+ units) never none."""
    val = {k for k in keys if held_out(k, val_fraction)}
    if len(keys) >= 2 and not val:
        val = {min(keys, key=lambda k: hashlib.sha256(k.encode()).digest())}
    if len(val) == len(keys) and keys:
        val.discard(max(keys, key=lambda k: hashlib.sha256(k.encode()).digest()))
    return val


_FILE_HASHES: dict[tuple[str, int, int], bytes] = {}
_UNITS: dict[tuple[str, str], list[tuple[str, str]]] = {}


def file_sha256(path: Path) -> bytes:
    """SHA-256 of a file's bytes, memoized on (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = hashlib.sha256(path.read_bytes()).digest()
    return _FILE_HASHES[key]


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl file must be "
                             "a JSON object with a string 'text' field") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{lineno}: no string 'text' field; each line of a .jsonl file must be "
                             "a JSON object like {\"text\": \"...\"}")
        docs.append(row["text"])
    return docs


# ---- docstrings, by parsing (never importing) the standard library ----------------------------------
def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def docstring_document(source: str, module: str) -> str:
    """The module's, classes' and functions' docstrings as one document, each under its signature."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    chunks = []
    doc = ast.get_docstring(tree)
    if doc:
        chunks.append(f"Module {module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    chunks.append(f"class {name}\n\n{doc}")
                visit(child, name)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    chunks.append(f"{name}({ast.unparse(child.args)})\n\n{doc}")
                visit(child, name)

    visit(tree, module)
    return "\n\n\n".join(chunks)


def pydoc_topics() -> dict[str, str]:
    """`pydoc_data.topics.topics` (the language reference as plain text), read with `ast.literal_eval`."""
    path = stdlib_root() / "pydoc_data" / "topics.py"
    if not path.is_file():
        return {}
    for node in ast.parse(read_text(path)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


# ---- sources -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One named source of documents with its epoch count; `path` is a file, a folder or @stdlib-*."""

    name: str
    path: str
    epochs: float

    @property
    def is_stdlib(self) -> bool:
        return self.path in (STDLIB_TEXT, STDLIB_CODE)

    def files(self) -> list[tuple[Path, str]]:
        """(absolute path, key) of every input file, sorted by key."""
        if self.path == STDLIB_CODE:
            return [(stdlib_root() / rel, rel) for rel in stdlib_files()]
        if self.path == STDLIB_TEXT:
            topics = stdlib_root() / "pydoc_data" / "topics.py"
            extra = [(topics, "pydoc_data/topics.py")] if topics.is_file() else []
            return extra + [(stdlib_root() / rel, rel) for rel in stdlib_files()]
        root = Path(self.path)
        if root.is_file():
            if root.suffix not in SUFFIXES:
                raise ValueError(f"--data {self.name}={self.path}: unsupported file type {root.suffix!r}; "
                                 f"use {', '.join(SUFFIXES)}")
            return [(root, root.name)]
        found = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                       if p.suffix in SUFFIXES and p.is_file()
                       and not any(s.startswith(".") for s in p.relative_to(root).parts))
        if not found:
            raise ValueError(f"--data {self.name}={self.path}: no {', '.join(SUFFIXES)} files in that folder")
        return [(p, rel) for rel, p in found]

    def fingerprint(self) -> str:
        """SHA-256 of the inputs' contents (and of the extraction format): the cache key of its tokens."""
        h = hashlib.sha256(f"{FORMAT_VERSION}\0{self.path if self.is_stdlib else ''}".encode())
        for path, key in self.files():
            h.update(key.encode() + b"\0" + file_sha256(path))
        return h.hexdigest()

    def units(self) -> list[tuple[str, str]]:
        """(split key, document) pairs; documents with the same key are split together.

        Memoized per content fingerprint: the tokenizer and both splits read them without re-parsing.
        """
        key = (self.path, self.fingerprint())
        if key not in _UNITS:
            _UNITS.clear()  # keep one source's documents at a time
            _UNITS[key] = self._read_units()
        return _UNITS[key]

    def _read_units(self) -> list[tuple[str, str]]:
        if self.path == STDLIB_CODE:
            return [(key, read_text(path)) for path, key in self.files()]
        if self.path == STDLIB_TEXT:
            out = [(f"pydoc_data/topics/{name}", text) for name, text in sorted(pydoc_topics().items())]
            out += [(rel, docstring_document(read_text(stdlib_root() / rel), _module_name(rel)))
                    for rel in stdlib_files()]
            return out
        out = []
        for path, key in self.files():
            docs = read_jsonl(path) if path.suffix == ".jsonl" else [read_text(path)]
            out += [(key, d) for d in docs]
        return out

    def documents(self, split: str, val_fraction: float) -> list[str]:
        """The non-empty documents of `split` ("train" or "val")."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        units = [(k, d) for k, d in self.units() if d.strip()]
        if not units:
            raise ValueError(f"--data {self.name}={self.path}: the source is empty (no text in its files)")
        keys = sorted({k for k, _ in units})
        if len(keys) == 1 and len(units) >= 2:  # one file of many rows: split by row
            units = [(f"{k}#{i}", d) for i, (k, d) in enumerate(units)]
            keys = [k for k, _ in units]
        if len(keys) == 1:  # one document: hold out its tail, cut at a line boundary
            text = units[0][1]
            cut = text.rfind("\n", 0, math.floor(len(text) * (1 - val_fraction)))
            cut = cut + 1 if cut > 0 else math.floor(len(text) * (1 - val_fraction))
            return [text[:cut]] if split == "train" else [text[cut:]]
        val = _split_units(keys, val_fraction)
        return [d for k, d in units if (k in val) == (split == "val")]


def parse_data_spec(spec: str) -> Source:
    """`NAME=PATH[:EPOCHS]` -> Source. PATH may be @stdlib-text or @stdlib-code; EPOCHS defaults to 1."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--data {spec!r}: expected NAME=PATH[:EPOCHS], e.g. --data code=./src:4")
    if not _NAME_RE.match(name):
        raise ValueError(f"--data {spec!r}: the name {name!r} may hold only letters, digits, '_', '-' and '.'")
    path, epochs = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon:
        try:
            path, epochs = head, float(tail)
        except ValueError:
            pass  # a ':' inside the path, no epoch count
    if not (epochs > 0 and math.isfinite(epochs)):
        raise ValueError(f"--data {spec!r}: EPOCHS must be a positive number, got {tail!r}")
    if path not in (STDLIB_TEXT, STDLIB_CODE):
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"--data {spec!r}: {p} does not exist")
        path = str(p.resolve())
    return Source(name=name, path=path, epochs=epochs)


def resolve_sources(specs: list[str]) -> list[Source]:
    """Sources from `--data` specs (the embedded corpus when there are none); names must be unique."""
    sources = [parse_data_spec(s) for s in (specs or DEFAULT_SPECS)]
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--data names must be unique; repeated: {', '.join(dupes)}")
    return sources
