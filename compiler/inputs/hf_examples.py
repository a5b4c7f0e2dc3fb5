"""The example inputs of a Hugging Face teacher: the tokens, pixels or signal its class takes.

Text models get token ids of a real sentence (``SENTENCES``), padded to the sequence length (the
timing shape: ``--sequence-length``, else ``DEFAULT_SEQUENCE_LENGTH`` within the config's position
limit), with the folder's tokenizer when it has one and random ids otherwise; vision models get one
real photograph resized to the config's ``image_size``; audio models a waveform or spectrogram
(``potstill.inputs.hf.signal_inputs``). An encoder-decoder also gets ``decoder_input_ids``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from potstill.inputs.hf import accepts, signal_inputs, with_decoder_inputs
from potstill.inputs.hf_files import tokenizer_fix
from torch import nn

#: Real sentences for the example inputs of text models (not a benchmark: shapes and realism).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Compilers translate programs written in one language into another language.",
    "A small model that runs fast on the device is often better than a large one that does not.",
    "She planted tomatoes in the garden before the first rain of spring.",
)

#: token count of a text teacher's example inputs (the timing shape) unless --sequence-length says
DEFAULT_SEQUENCE_LENGTH = 32


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False, spec: str | None = None) -> Any:
    """The tokenizer saved in a model directory, or None when there is none; ``InputError`` naming
    the folder's tokenizer files when they are there but do not load."""
    present = [name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]
    if not present:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many kinds for a broken or partial tokenizer
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise InputError(f"teacher '{spec or f'hf:{path}'}': the tokenizer in {path} ({', '.join(present)}) does not "
                         f"load: {type(e).__name__}: {first}; {tokenizer_fix(Path(path))}") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


_accepts = accepts


def hf_example_inputs(model: nn.Module, config: Any, tokenizer: Any, seq_len: int = 32,
                       path: Path | None = None) -> dict[str, Any]:
    """The inputs of the class's ``main_input_name`` (tokens, pixels, a waveform, a spectrogram),
    with ``decoder_input_ids`` for an encoder-decoder."""
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        return {"pixel_values": example_pixels(config)}
    if main != "input_ids":
        return with_decoder_inputs(model, signal_inputs(model, config, main, path))
    if tokenizer is not None:
        return tokenize(tokenizer, list(SENTENCES[:1]), model, seq_len)
    vocab = int(getattr(config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    kwargs: dict[str, Any] = {
        "input_ids": torch.randint(0, vocab, (1, seq_len), generator=gen),
        "attention_mask": torch.ones(1, seq_len, dtype=torch.long),
    }
    if _accepts(model, "token_type_ids") and int(getattr(config, "type_vocab_size", 0) or 0) > 0:
        kwargs["token_type_ids"] = torch.zeros(1, seq_len, dtype=torch.long)
    return with_decoder_inputs(model, kwargs)


def tokenize(tokenizer: Any, texts: list[str], model: nn.Module, seq_len: int) -> dict[str, Any]:
    """Token ids padded to ``seq_len``, with the inputs the model's forward accepts."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return with_decoder_inputs(model, {k: enc[k] for k in keep if k in enc and (k == "input_ids" or _accepts(model, k))})


def packed_windows(tokenizer: Any, texts: Iterable[str], model: nn.Module, seq_len: int,
                   batch_size: int) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Batches of ``batch_size`` windows of ``seq_len`` tokens cut from the texts read as one stream
    (lines joined by newlines, tokenized a few hundred at a time): every position a real token, each
    window starting mid-text, as a causal LM reads prose (FLAP, SliceGPT and ShortGPT calibrate on
    such windows). A last partial batch is kept; a last partial window is dropped."""
    buffer: list[int] = []
    windows: list[list[int]] = []
    chunk: list[str] = []

    def batch() -> dict[str, Any]:
        ids = torch.tensor(windows, dtype=torch.long)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return with_decoder_inputs(model, {k: v for k, v in inputs.items() if k == "input_ids" or _accepts(model, k)})

    def flush() -> Iterator[dict[str, Any]]:
        nonlocal buffer, windows
        buffer += tokenizer("\n".join(chunk) + "\n", add_special_tokens=False)["input_ids"]
        while len(buffer) >= seq_len:
            windows.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
            if len(windows) == batch_size:
                yield batch()
                windows = []

    for text in texts:
        chunk.append(text)
        if len(chunk) == 256:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()
    if windows:
        yield batch()


def example_pixels(config: Any) -> torch.Tensor:
    """One real photograph (scikit-image's cat), resized and normalised to the config's image size."""
    vision = getattr(config, "vision_config", None)  # CLIP/SigLIP-style: the sizes live in the vision tower
    size = getattr(config, "image_size", None) or getattr(vision, "image_size", None) or 224
    size = size if isinstance(size, int) else int(size[0])
    channels = int(getattr(config, "num_channels", None) or getattr(vision, "num_channels", None) or 3)
    try:
        from skimage import data as skdata

        img = torch.tensor(skdata.chelsea(), dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        img = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
        img = (img - 0.5) / 0.5
        if channels != 3:
            img = img.mean(1, keepdim=True).expand(1, channels, size, size).contiguous()
        return img
    except ImportError:
        return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))

