"""A Hugging Face folder's files, checked before transformers reads them, so a bad file is named.

transformers raises whatever its readers raise: ``SafetensorError: header too large`` for a random
``model.safetensors``, ``OverflowError`` for a truncated one, ``JSONDecodeError`` deep in a tokenizer
(or returns no tokenizer at all). Each check here reads only what identifies a broken file:

* weights — every ``*.safetensors`` file's header (``safe_open``: the 8-byte length, the JSON header,
  and that every tensor's byte range lies inside the file), no tensor data;
* tokenizer — the JSON files parse and ``AutoTokenizer`` builds;
* sequence length — at most the positions the config declares (``max_position_embeddings`` and its
  per-family spellings): a longer example fails in the position embedding, far from the flag.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from potstill.errors import InputError

#: config fields that bound the token positions a model embeds, per family spelling
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")

#: the tokenizer's JSON files: each must parse when present
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_weight_files(path: Path, spec: str) -> None:
    """Every ``*.safetensors`` file in ``path`` has a readable header whose tensors fit in the file."""
    from safetensors import safe_open

    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as f:
                list(f.keys())
        except Exception as e:  # SafetensorError (no public class to name), OverflowError, OSError
            raise InputError(
                f"teacher '{spec}': {weights} is not a readable safetensors file ({type(e).__name__}: {e}); "
                "it is truncated or corrupt: download or save_pretrained the model again"
            ) from e


def max_positions(config: Any) -> tuple[str, int] | None:
    """(field, value) of the config's bound on token positions, or None when it states none.

    >>> from types import SimpleNamespace
    >>> max_positions(SimpleNamespace(max_position_embeddings=512))
    ('max_position_embeddings', 512)
    >>> max_positions(SimpleNamespace()) is None
    True
    """
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def check_sequence_length(config: Any, sequence_length: int | None, spec: str) -> None:
    """``--sequence-length`` must fit the model's positions (refused with the model's max)."""
    bound = max_positions(config)
    if sequence_length is None or bound is None or sequence_length <= bound[1]:
        return
    name, limit = bound
    raise InputError(
        f"--sequence-length {sequence_length}: teacher '{spec}' embeds at most {limit} token positions "
        f"(config.json '{name}' = {limit}); give --sequence-length {limit} or less "
        "(without the flag, the profile's sequence_length is used)"
    )


def check_tokenizer_files(path: Path, spec: str) -> None:
    """The tokenizer's JSON files parse (a broken one is named)."""
    for name in TOKENIZER_JSON:
        file = path / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise InputError(f"teacher '{spec}': {file} is not valid JSON ({e}); {tokenizer_fix(path)}") from e


def tokenizer_fix(path: Path) -> str:
    """What to do about a tokenizer that does not load."""
    return (f"save the tokenizer again (tokenizer.save_pretrained('{path}')), or remove its files to "
            "calibrate on random token ids")


def remote_code_note(raw: Mapping[str, Any], spec: str, trust_remote_code: bool) -> str | None:
    """The console note for a config with ``auto_map`` and a ``model_type`` transformers knows: the
    built-in class is used and the folder's code is not run (unless ``--trust-remote-code``)."""
    if "auto_map" not in raw or trust_remote_code:
        return None
    return (f"note: teacher '{spec}': config.json has 'auto_map' (Python code in the folder); potstill uses "
            f"transformers' built-in '{raw.get('model_type')}' classes and ignores that code "
            "(give --trust-remote-code to run it instead)")
