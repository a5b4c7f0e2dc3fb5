"""Batches and user data: one convention for calibration, training and evaluation data.

A ``Batch`` is what a model consumes: positional ``args``, keyword ``kwargs`` and an optional
``target`` (labels). ``as_batch`` turns what users naturally yield into one:

* a tensor ``x``                       -> ``Batch((x,))``
* a pair ``(x, y)``                    -> ``Batch((x,), target=y)``
* a dict (Hugging Face style)          -> ``Batch((), kwargs, target=kwargs.pop("labels"))``
* a ``Batch``                          -> itself

``load_callable("path/to/file.py:fn")`` imports a user function from a file. ``image_files`` and
``load_image`` read a folder of photographs (PIL) for calibration.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError


@dataclass
class Batch:
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        return Batch(
            tuple(move(a) for a in self.args),
            {k: move(v) for k, v in self.kwargs.items()},
            move(self.target),
        )

    @property
    def size(self) -> int:
        """Batch size: the leading dim of the first tensor input."""
        for x in (*self.args, *self.kwargs.values()):
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                return int(x.shape[0])
        return 1

    def run(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)


def token_mask(batch: Batch) -> torch.Tensor | None:
    """The batch's 2-D ``attention_mask`` (0 marks padding), else None."""
    mask = batch.kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def run_with_masks(model: Callable[..., Any], batches: Iterable[Any], on_mask: Callable[[torch.Tensor | None], None]) -> None:
    """Run ``model`` over ``batches`` in eval mode without gradients (its mode restored after),
    handing each batch's ``token_mask`` to ``on_mask`` first: hooks that gather statistics read it
    to leave padding tokens out."""
    module = model if isinstance(model, torch.nn.Module) else None
    training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            for raw in batches:
                batch = as_batch(raw)
                on_mask(token_mask(batch))
                batch.run(model)
    finally:
        if module is not None:
            module.train(training)


def as_batch(obj: Any) -> Batch:
    if isinstance(obj, Batch):
        return obj
    if isinstance(obj, torch.Tensor):
        return Batch((obj,))
    if isinstance(obj, Mapping):
        kwargs = dict(obj)
        target = kwargs.pop("labels", None)
        return Batch((), kwargs, target)
    if isinstance(obj, (tuple, list)):
        if len(obj) == 2 and all(isinstance(o, torch.Tensor) for o in obj):
            return Batch((obj[0],), target=obj[1])
        if len(obj) == 2 and isinstance(obj[0], (tuple, list)):
            return Batch(tuple(obj[0]), target=obj[1])
        return Batch(tuple(obj))
    raise InputError(
        f"cannot use a {type(obj).__name__} as a batch: yield a tensor, an (inputs, labels) pair "
        "or a dict of model keyword inputs"
    )


def primary_output(out: Any) -> torch.Tensor:
    """The tensor that stands for a model's output: logits, last hidden state, or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(out, Mapping) and isinstance(out.get(key), torch.Tensor):
            return out[key]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise TypeError(f"model output of type {type(out).__name__} holds no tensor")


def import_file(path: str | Path, module_name: str | None = None) -> Any:
    """Import a Python file as a module (its directory goes on sys.path for sibling imports)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise InputError(f"{path}: no such file; give path/to/file.py:NAME")
    # a stable name (not hash(), which differs per process): torchrun ranks unpickle each other's modules
    name = module_name or f"potstill_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"{path}: cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise InputError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent))
    return module


def load_callable(spec: str) -> Callable[..., Any]:
    """``"path/to/file.py:NAME"`` -> the callable ``NAME`` defined in that file."""
    if ":" not in spec:
        raise InputError(f"'{spec}': expected path/to/file.py:NAME")
    path, name = spec.rsplit(":", 1)
    module = import_file(path)
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise InputError(f"{path}: defines no callable '{name}' (callables there: {', '.join(found)})")
    return fn


def iter_batches(source: Callable[..., Any] | Iterable[Any], limit: int | None = None) -> Iterator[Batch]:
    """Batches from a user data function (called with no args) or an iterable, at most ``limit``."""
    data = source() if callable(source) and not inspect.isgenerator(source) else source
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=32)
    for i, item in enumerate(data):
        if limit is not None and i >= limit:
            break
        yield as_batch(item)


# ---------------------------------------------------------------------------------------------
# Image folders

#: file suffixes read as images (anything PIL opens; these are the common ones)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_files(folder: str | Path, flag: str = "--calib") -> list[Path]:
    """The image files directly in ``folder``, sorted by name (a fixed order: deterministic batches)."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"{flag} '{folder}': no such folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{flag} '{folder}': the folder has no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def unreadable_image(path: Path, flag: str, error: Exception) -> InputError:
    """The error for an image file PIL refuses: unreadable, or past its decompression-bomb limit."""
    from PIL import Image

    if isinstance(error, Image.DecompressionBombError):
        return InputError(f"{flag} '{path}': the image has more pixels than PIL opens ({error}); downscale it "
                          "(the teacher's input is far smaller) or remove it")
    return InputError(f"{flag} '{path}': cannot read the image ({error}); remove it or convert it to PNG/JPEG")


def image_errors() -> tuple[type[Exception], ...]:
    """What PIL raises for a file it cannot open as an image (``DecompressionBombError`` is no ``OSError``)."""
    from PIL import Image, UnidentifiedImageError

    return OSError, UnidentifiedImageError, Image.DecompressionBombError


def load_image(path: Path, channels: int, flag: str = "--calib") -> Any:
    """A PIL image in RGB (3 channels) or grayscale (1 channel); InputError naming a file PIL cannot read."""
    from PIL import Image

    if channels not in (1, 3):
        raise InputError(f"{flag} '{path.parent}': images give 1 or 3 channels, the teacher takes {channels}")
    try:
        with Image.open(path) as img:
            return img.convert("L" if channels == 1 else "RGB")
    except image_errors() as e:
        raise unreadable_image(path, flag, e) from e


def resize_center_crop(image: Any, height: int, width: int) -> torch.Tensor:
    """``[C, H, W]`` floats in [0, 1]: scale so the image covers ``height x width``, then crop the centre.

    The usual evaluation transform of image classifiers (resize, centre crop) without distorting
    the aspect ratio.
    """
    import numpy as np
    from PIL import Image

    w0, h0 = image.size
    scale = max(height / h0, width / w0)
    w1, h1 = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    image = image.resize((w1, h1), Image.Resampling.BICUBIC)
    left, top = (w1 - width) // 2, (h1 - height) // 2
    image = image.crop((left, top, left + width, top + height))
    arr = np.asarray(image, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr.copy())
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()
