"""Text corpora for ``--calib`` / ``--data``: a UTF-8 file of one sentence per line, streamed with caps
on lines, bytes and line length, so a huge or binary file cannot exhaust memory or pass silently;
and the default English corpus, sentences from installed packages' docstrings (``docstring_corpus``)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from potstill.errors import InputError


def is_text_file(spec: str) -> bool:
    path = Path(spec)
    return path.suffix in {".txt", ".text", ".md"} and ":" not in path.name


#: a corpus is streamed line by line and read up to these caps (stated on the console when reached)
MAX_CORPUS_LINES = 100_000
MAX_CORPUS_BYTES = 64 * 2**20
MAX_LINE_BYTES = 16 * 2**10


def read_texts(path_text: str, flag: str = "--calib", note: Callable[[str], None] = print) -> list[str]:
    """Non-empty lines of a UTF-8 text file, streamed: at most ``MAX_CORPUS_LINES`` lines and
    ``MAX_CORPUS_BYTES`` bytes are read, and each line is cut at ``MAX_LINE_BYTES`` (a 1 GB file of one
    line is read as 16 KB, not into memory whole). A binary or non-UTF-8 file is refused, named."""
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"{flag} '{path_text}': no such file")
    texts: list[str] = []
    read = 0
    cut_lines = 0
    capped = ""
    with path.open("rb") as f:
        while True:
            if len(texts) >= MAX_CORPUS_LINES:
                capped = f"the first {MAX_CORPUS_LINES:,} lines"
                break
            if read >= MAX_CORPUS_BYTES:
                capped = f"the first {MAX_CORPUS_BYTES // 2**20} MB"
                break
            raw = f.readline(MAX_LINE_BYTES)
            if not raw:
                break
            read += len(raw)
            if not raw.endswith(b"\n"):  # a line longer than the cap: skip the rest of it
                rest = f.readline(MAX_LINE_BYTES)
                cut_lines += bool(rest)
                while rest and not rest.endswith(b"\n") and read < MAX_CORPUS_BYTES:
                    read += len(rest)
                    rest = f.readline(MAX_LINE_BYTES)
            if b"\0" in raw:
                raise InputError(f"{flag} '{path_text}': a binary file (NUL bytes near byte {read:,}); give a UTF-8 "
                                 "text file with one sentence per line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if len(raw) == MAX_LINE_BYTES and e.start >= len(raw) - 3:  # a character split by the cut
                    line = raw[: e.start].decode("utf-8")
                else:
                    raise InputError(f"{flag} '{path_text}': not UTF-8 text (byte {e.start} of line {len(texts) + 1}); "
                                     "give a UTF-8 text file with one sentence per line") from e
            line = line.strip()
            if line:
                texts.append(line)
    if capped:
        note(f"{flag} '{path_text}': read {capped} of the file (the corpus cap)")
    if cut_lines:
        note(f"{flag} '{path_text}': {cut_lines} line(s) longer than {MAX_LINE_BYTES // 2**10} KB were cut there")
    if not texts:
        raise InputError(f"{flag} '{path_text}': the file has no text lines")
    return texts


#: Modules whose docstrings make the default English corpus (installed with potstill's dependencies).
CORPUS_MODULES = (
    "argparse", "json", "collections", "pathlib", "functools", "itertools", "subprocess", "logging",
    "torch.nn.modules.conv", "torch.nn.modules.linear", "torch.nn.modules.activation", "torch.optim.adamw",
    "inspect", "typing", "shutil", "statistics", "threading", "torch.nn.modules.module", "torch.nn.modules.rnn",
)  # fmt: skip


def docstring_corpus(limit: int = 64, modules: Sequence[str] = CORPUS_MODULES) -> list[str]:
    """English sentences from installed packages' docstrings, in a fixed order (deterministic)."""
    import importlib

    sentences: list[str] = []
    seen: set[str] = set()
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod) or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in sorted(vars(mod).items()) if inspect.isclass(obj) or inspect.isfunction(obj)]
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                for sent in re.split(r"(?<=[.!?])\s+", text):
                    if 40 <= len(sent) <= 300 and sent[0].isupper() and sent.endswith(".") and sent not in seen:
                        if sum(c.isalpha() or c == " " for c in sent) < 0.9 * len(sent):
                            continue  # code, formulas, tables
                        seen.add(sent)
                        sentences.append(sent)
                        if len(sentences) >= limit:
                            return sentences
    return sentences
