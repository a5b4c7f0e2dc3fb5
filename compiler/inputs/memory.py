"""Peak memory of a compile, estimated before it starts, and the check that refuses one that cannot fit.

The estimate is a sum of parts, each a multiple of the teacher's weight bytes ``W`` (parameters ×
bytes per element, read from safetensors headers for ``hf:DIR`` before anything is loaded):

    peak ≈ R + W · (1 + c_student · n_students + c_lower + c_work)

- ``R``: the runtime (torch, transformers, ONNX, ONNX Runtime imported) and fixed costs, 0.8 GB;
- the teacher itself (``W``);
- ``c_student`` per student alive at once: each starts sharing the teacher's tensors
  (``potstill.ir.cow``) and holds only what pruning sliced or training wrote (the driver records each
  student and drops it before the next, so one);
- ``c_lower``: lowering — the ONNX Runtime session's copy of the weights (+1.05 W measured with
  external data, which ``targets.large_onnx`` uses from 128 MiB) and the exporter's (+0.3 W);
- ``c_work``: importance scores, pruning's transient copies, parity runs, allocator slack;
- ``data``: the text corpora of ``--calib`` / ``--data`` as read — each streamed and capped at
  ``corpus.MAX_CORPUS_BYTES`` (a 1 GB file costs at most that, never its size), counted twice
  (the bytes and the Python strings); image folders as read — every image used is decoded at
  once (width × height × C bytes, 8-bit, from each file's header) and becomes float32 pixels at the
  teacher's input size, counted twice (the per-image tensors and the stacked batch), i.e.
  ``Σ w·h·C + 2 · n · C·H·W · 4``, with ``n`` the images read (``--calib``: the calibration batches,
  ``--data``: the whole folder); Python data functions are the user's and stream or not.

Fitted to ``bench/scale_profile.py`` / ``bench/scale_llm.py`` on Llama-style decoders (44M, 124M and
336M parameters, 32k vocabulary, GQA) through the default command: child peak RSS 1.18, 1.82 and
3.98 GB, i.e. 0.76 GB + 2.4 W; the estimate takes 3.0 W. The factors are rounded up: the check
refuses what would certainly not fit, it does not predict to the megabyte.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from potstill.errors import InputError
from torch import nn

GB = 1e9
#: the imported runtime (torch, transformers, onnx, onnxruntime, rich, matplotlib) and what does not
#: scale with the model: the fit of the CLI's peak RSS over 44M and 124M parameters crosses 0.78 GB
RUNTIME_BYTES = int(0.8 * GB)
#: multiples of the teacher's weight bytes; see the module docstring (fitted, rounded up)
STUDENT_FACTOR = 0.6
LOWER_FACTOR = 1.1
WORK_FACTOR = 0.3

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


@dataclass(frozen=True)
class MemoryEstimate:
    """An estimated peak of one compile, by part (bytes)."""

    params: int
    weight_bytes: int
    students: int
    parts: dict[str, int]

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    def text(self) -> str:
        """``estimated peak memory 3.1 GB (runtime 0.6, teacher 0.5, 1 student 0.5, ...)``"""
        inner = ", ".join(f"{k} {v / GB:.1f}" for k, v in self.parts.items())
        return f"estimated peak memory {self.peak_bytes / GB:.1f} GB ({inner}; {self.params / 1e6:.0f}M parameters)"


def corpus_bytes(specs: Sequence[str | None]) -> int:
    """Bytes the text corpora among ``specs`` hold once read (see the module docstring).

    >>> corpus_bytes([None, "data.py:batches"])
    0
    """
    from potstill.inputs.corpus import MAX_CORPUS_BYTES, is_text_file

    total = 0
    for spec in specs:
        if spec and is_text_file(spec) and Path(spec).is_file():
            total += 2 * min(Path(spec).stat().st_size, MAX_CORPUS_BYTES)
    return total


#: the input an image teacher is assumed to take before it is loaded, when its config.json does
#: not say (``num_channels``, ``image_size``): the ImageNet size most image processors produce
DEFAULT_IMAGE_CHW = (3, 224, 224)


def image_folder_bytes(folder: str | os.PathLike[str], chw: tuple[int, int, int], limit: int | None = None,
                       flag: str = "--data") -> int:
    """Bytes the images of ``folder`` hold once read for a teacher taking ``C×H×W`` (see the module
    docstring); ``limit``: at most that many images are read (the first, by name). Only each file's
    header is read (PIL opens lazily); a file PIL cannot open is named, as the loader would.

    >>> image_folder_bytes("no-such-folder", (3, 8, 8))
    Traceback (most recent call last):
    potstill.errors.InputError: --data 'no-such-folder': no such folder
    """
    from PIL import Image
    from potstill.inputs.data import image_errors, image_files, unreadable_image

    c, h, w = chw
    used = image_files(folder, flag)[:limit]
    decoded = 0
    for path in used:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except image_errors() as e:
            raise unreadable_image(path, flag, e) from e
        decoded += width * height * c
    return decoded + 2 * len(used) * c * h * w * 4


def hf_image_chw(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """``(C, H, W)`` an HF vision model takes, from its config.json (``DEFAULT_IMAGE_CHW`` where it is silent)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_IMAGE_CHW
    size = config.get("image_size") if isinstance(config, dict) else None
    channels = config.get("num_channels") if isinstance(config, dict) else None
    c = channels if isinstance(channels, int) and channels > 0 else DEFAULT_IMAGE_CHW[0]
    if isinstance(size, int) and size > 0:
        return c, size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return c, int(size[0]), int(size[1])
    return c, *DEFAULT_IMAGE_CHW[1:]


def estimate_compile_memory(params: int, weight_bytes: int | None = None, *, students: int = 1,
                            data_bytes: int = 0) -> MemoryEstimate:
    """The estimate for a teacher of ``params`` parameters taking ``weight_bytes`` (fp32 if None).

    >>> round(estimate_compile_memory(124_000_000).peak_bytes / 1e9, 1)  # measured peak: 1.82 GB
    2.3
    """
    w = params * 4 if weight_bytes is None else weight_bytes
    parts = {
        "runtime": RUNTIME_BYTES,
        "teacher": w,
        f"{students} student{'s' if students != 1 else ''}": int(STUDENT_FACTOR * students * w),
        "lowering": int(LOWER_FACTOR * w),
        "work": int(WORK_FACTOR * w),
    }
    if data_bytes:
        parts["data"] = data_bytes
    return MemoryEstimate(params, w, students, parts)


def release_freed_memory() -> None:
    """Collect garbage cycles and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    After a student is recorded its tensors, ONNX protos and the ONNX Runtime session are freed, but
    reference cycles wait for the collector and glibc keeps freed small-block arenas mapped; without
    this the next stage (the teacher's engine) starts on top of the last student's leftovers."""
    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        trim = getattr(libc, "malloc_trim", None)
    except OSError:  # not glibc: nothing to trim
        return
    if trim is not None:
        trim(0)


def module_weights(module: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a loaded module; tied tensors counted once."""
    seen: set[int] = set()
    n = size = 0
    for p in [*module.parameters(), *module.buffers()]:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() if p.is_floating_point() else 0
            size += p.numel() * p.element_size()
    return n, size


def hf_dir_weights(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(parameters, bytes) of a saved Hugging Face model from its safetensors headers, without loading it.

    A safetensors file starts with an 8-byte little-endian header length and a JSON header giving
    each tensor's dtype and shape (huggingface/safetensors, *Format*). None when there are none;
    ``InputError`` naming a truncated or corrupt file (its 8 bytes may claim an exabyte of header).
    """
    from potstill.inputs.hf_files import check_weight_files

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    check_weight_files(Path(path), f"hf:{path}")
    n = size = 0
    for f in files:
        with open(f, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= int(d)
            n += count
            size += count * _DTYPE_BYTES.get(info["dtype"], 4)
    return n, size


def available_bytes() -> int:
    """Memory this process can still take: the smaller of the system's available memory and the
    cgroup's limit less its usage (a container's ``memory.max``)."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    cg = Path("/sys/fs/cgroup")
    try:
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int((cg / "memory.current").read_text()))
    except (OSError, ValueError):  # no cgroup v2 memory controller here
        pass
    return avail


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``12G``, ``12GB``, ``1500M``, ``8GiB`` or a plain number of bytes.

    >>> parse_size("1.5G"), parse_size("2GiB"), parse_size("300")
    (1500000000, 2147483648, 300)
    """
    m = _SIZE.match(str(text))
    if not m:
        raise InputError(f"--max-memory {text!r}: give a size such as 12G, 1500M or 8GiB")
    value, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def check_fits(estimate: MemoryEstimate, max_memory: int | None = None, available: int | None = None) -> None:
    """Raise ``InputError`` when the estimate exceeds ``--max-memory`` or what the machine has free."""
    avail = available_bytes() if available is None else available
    limits = [(avail, "the memory available on this machine")]
    if max_memory is not None:
        limits.append((max_memory, "--max-memory"))
    limit, what = min(limits)
    if estimate.peak_bytes > limit:
        data = estimate.parts.get("data", 0)
        fix = (f"Its data part ({data / GB:.1f} GB: --calib / --data as read) shrinks with fewer or smaller images, "
               "or a FILE.py:FN that streams batches. " if data > estimate.peak_bytes - limit else "")
        raise InputError(
            f"{estimate.text()} exceeds {what} ({limit / GB:.1f} GB). {fix}Compile fewer students at once "
            f"(one --ratio per run), free memory, or raise --max-memory if you know better"
        )


def preflight_memory(
    teacher: str | nn.Module,
    *,
    students: int = 1,
    max_memory: int | None = None,
    data: Sequence[str | None] = (),
    images: Sequence[tuple[str, str | None, int | None]] = (),
    image_chw: tuple[int, int, int] | None = None,
    note: Callable[[str], None] = print,
) -> MemoryEstimate | None:
    """Estimate, print and check a compile's peak before the heavy work.

    ``teacher`` is the spec (``hf:DIR``: sized from its safetensors headers before it is loaded;
    other specs give None, to be checked once loaded) or the loaded module. potstill holds the
    teacher in float32, so the weights count 4 bytes per parameter at least. ``data`` are the
    ``--calib`` / ``--data`` specs (text corpora count as read: ``corpus_bytes``). ``images``:
    ``(flag, spec, most images read or None for all)``; the specs that are folders count as read
    (``image_folder_bytes``) at ``image_chw``, the loaded teacher's image input (None: an ``hf:DIR``
    teacher's config.json says, else ``DEFAULT_IMAGE_CHW``; a loaded teacher without one reads no images).
    """
    if isinstance(teacher, str):
        weights = hf_dir_weights(teacher[3:]) if teacher.startswith("hf:") else None
        if weights is None:
            return None
        chw: tuple[int, int, int] | None = hf_image_chw(teacher[3:])
    else:
        weights = module_weights(teacher)
        chw = image_chw
    params, size = weights
    data_bytes = corpus_bytes(data)
    if chw is not None:
        data_bytes += sum(image_folder_bytes(spec, chw, limit, flag) for flag, spec, limit in images
                          if spec and Path(spec).is_dir())
    estimate = estimate_compile_memory(params, max(size, 4 * params), students=students, data_bytes=data_bytes)
    note(estimate.text())
    check_fits(estimate, max_memory)
    return estimate
