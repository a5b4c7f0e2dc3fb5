"""Calibration and training batches: what ``--calib`` and ``--data`` name, or the teacher's defaults.

``load_calibration`` picks the calibration batches: a ``FILE.py:FN``, a folder of images (image
models; the teacher file may define ``preprocess(image)``), the teacher file's ``calib_data``, or for
text models a tokenizer over a text file or, by default, the docstrings of installed packages
(``potstill.inputs.corpus.docstring_corpus``). ``load_data`` reads ``--data`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from potstill.inputs.corpus import docstring_corpus, is_text_file, read_texts
from potstill.inputs.data import image_files, load_callable, load_image
from potstill.inputs.hf_examples import load_tokenizer, packed_windows, tokenize
from potstill.inputs.hf_files import max_positions
from potstill.inputs.teacher import Teacher

#: the ImageNet channel statistics most vision checkpoints were trained with (torchvision, timm)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


#: sentences a text corpus calibrates with at least, after a quarter is held out (Kwon et al. 2022's
#: layer-wise least squares fits hundreds of unknowns per layer; 64 sentences overfit it)
TEXT_CALIB_SENTENCES = 512


def text_calib_batches(batch_size: int, sentences: int = TEXT_CALIB_SENTENCES) -> int:
    """The fewest batches ``n`` whose calibration part (``n`` minus the quarter that
    ``potstill.fidelity.split_heldout`` holds out) has ``sentences`` sentences.

    >>> text_calib_batches(8)
    85
    """
    need = -(-sentences // batch_size)
    n = need + 1
    while n - max(1, round(0.25 * n)) < need:
        n += 1
    return n


def load_calibration(
    spec: str | None,
    teacher: Teacher,
    *,
    batch_size: int = 8,
    num_batches: int = 16,
    seq_len: int = 64,
    note: Callable[[str], None] = print,
) -> Callable[[], Iterable[Any]] | None:
    """Calibration batches: ``FILE.py:FN``, a folder of images (image models), a text file (text
    models), the teacher file's ``calib_data``, or for Hugging Face text models the docstrings of
    installed packages.

    Returns a callable producing an iterable of batches, or None when nothing applies (the caller
    then warns: see ``random_calibration_warning``). The driver holds out a part of these batches
    to measure fidelity (``potstill.fidelity.split_heldout``), so ``num_batches`` leaves room for it.
    """
    if spec:
        if is_text_file(spec):  # the refit needs tokens: at least TEXT_CALIB_SENTENCES after the held-out split
            num_batches = max(num_batches, text_calib_batches(batch_size))
        return load_data(spec, teacher, "--calib", batch_size=batch_size, num_batches=num_batches,
                         seq_len=seq_len, note=note)  # fmt: skip
    if "calib_data" in teacher.hooks:
        return teacher.hooks["calib_data"]
    if teacher.hf is not None and "input_ids" in teacher.example_kwargs:
        if load_tokenizer(teacher.hf["path"]) is None:
            note(f"note: {teacher.spec} has no tokenizer and no --calib was given: data-driven importance "
                 "falls back to random token ids (give --calib FILE.py:FN)")  # fmt: skip
            return None
        num_batches = max(num_batches, text_calib_batches(batch_size))  # as for a --calib corpus
        texts = docstring_corpus(batch_size * num_batches)
        note(
            f"note: no --calib given; calibrating on {len(texts)} sentences from the docstrings of "
            "installed packages (give --calib corpus.txt or FILE.py:FN for your domain)"
        )
        return _text_batches(teacher, texts, batch_size, num_batches, seq_len)
    return None


def load_data(
    spec: str,
    teacher: Teacher,
    flag: str = "--data",
    *,
    batch_size: int = 8,
    num_batches: int | None = None,
    seq_len: int = 64,
    note: Callable[[str], None] = print,
) -> Callable[[], Iterable[Any]]:
    """Batches from what ``--data`` / ``--calib`` name: ``FILE.py:FN``, a folder of images or a text file.

    Images and text are read now, so a bad file fails before any heavy work; ``num_batches=None``
    reads all of them.
    """
    if Path(spec).is_dir():
        return image_batches(spec, teacher, flag, batch_size=batch_size, num_batches=num_batches, note=note)
    if is_text_file(spec):
        if teacher.hf is None or "input_ids" not in teacher.example_kwargs:
            raise InputError(f"{flag} '{spec}': a text file calibrates text models only; give FILE.py:FN")
        texts = read_texts(spec, flag, note)
        limit = len(texts) if num_batches is None else batch_size * num_batches
        return _text_batches(teacher, texts[:limit], batch_size, -(-min(limit, len(texts)) // batch_size), seq_len)
    return load_callable(spec)


def image_input(teacher: Teacher) -> tuple[str | None, tuple[int, int, int]] | None:
    """Where a teacher takes an image: ``(keyword or None for positional, (C, H, W))``, else None.

    An image model takes one float ``[N, C, H, W]`` input: ``pixel_values`` for Hugging Face
    vision models, or the only positional example input of a file teacher.
    """
    pixels = teacher.example_kwargs.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
        return "pixel_values", tuple(int(d) for d in pixels.shape[1:])  # type: ignore[return-value]
    args = teacher.example_inputs
    if (len(args) == 1 and not teacher.example_kwargs and isinstance(args[0], torch.Tensor)
            and args[0].dim() == 4 and args[0].is_floating_point()):  # fmt: skip
        return None, tuple(int(d) for d in args[0].shape[1:])  # type: ignore[return-value]
    return None


def random_calibration_warning(teacher: Teacher) -> str | None:
    """The loud console line for an image teacher with no calibration data (None otherwise)."""
    if image_input(teacher) is None:
        return None
    return (
        f"{teacher.label} is an image model and no calibration data was given (--calib, --data, or calib_data() "
        "/ train_data() in the teacher file): importance, reconstruction, BatchNorm re-estimation and INT8 calibration "
        "would run on random pixels, which makes them meaningless, and fidelity would be measured on "
        "noise. Give --calib FOLDER (a folder of .png/.jpg images like those the model will see) or "
        "--calib FILE.py:FN."
    )


def image_batches(
    folder: str,
    teacher: Teacher,
    flag: str = "--calib",
    *,
    batch_size: int = 8,
    num_batches: int | None = None,
    note: Callable[[str], None] = print,
) -> Callable[[], Iterator[Any]]:
    """Batches of the images in ``folder`` (sorted by name), transformed to the teacher's input.

    The transform, first that applies: the teacher file's ``preprocess(image) -> [C, H, W]`` (a PIL
    image in); a Hugging Face model's image processor (``preprocessor_config.json``); else resize
    and centre-crop to the example input's size, scale to [0, 1] and, for Hugging Face models,
    normalise with the ImageNet mean and std. Each choice that is a guess is noted.
    """
    where = image_input(teacher)
    if where is None:
        raise InputError(
            f"{flag} '{folder}': a folder of images calibrates image models only; {teacher.label} takes no "
            "[N, C, H, W] image input. Give FILE.py:FN"
        )
    key, (c, h, w) = where
    files = image_files(folder, flag)
    limit = len(files) if num_batches is None else batch_size * num_batches
    used, files = files[:limit], files[limit:]
    images = [load_image(p, c, flag) for p in used]
    pixels = _transform_images(images, teacher, (c, h, w), f"{flag} '{folder}'", note)
    extra = f" ({len(files)} more not used)" if files else ""
    note(f"note: {flag}: {len(used)} images from {folder}{extra}, as {c}x{h}x{w}")

    def batches() -> Iterator[Any]:
        for i in range(0, len(pixels), batch_size):
            x = pixels[i : i + batch_size]
            yield {key: x} if key else x

    return batches


def _transform_images(
    images: list[Any], teacher: Teacher, chw: tuple[int, int, int], where: str, note: Callable[[str], None]
) -> torch.Tensor:
    from potstill.inputs.data import resize_center_crop

    c, h, w = chw
    hook = teacher.hooks.get("preprocess")
    if hook is not None:
        try:
            out = [hook(img) for img in images]
        except Exception as e:
            raise InputError(f"{where}: the teacher file's preprocess() raised {type(e).__name__}: {e}") from e
        pixels = torch.stack([o.reshape(o.shape[-3:]) if isinstance(o, torch.Tensor) else torch.as_tensor(o) for o in out])
        if tuple(pixels.shape[1:]) != chw:
            raise InputError(
                f"{where}: preprocess() returned images of shape {tuple(pixels.shape[1:])}; the teacher's example "
                f"input is {c}x{h}x{w}: return a [C, H, W] tensor of that size"
            )
        return pixels.float()
    if teacher.hf is not None:
        processor = _image_processor(teacher.hf["path"])
        if processor is not None:
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].float()
            if tuple(pixels.shape[1:]) != chw:
                note(f"note: {where}: the image processor gives {tuple(pixels.shape[1:])}; resized to {c}x{h}x{w}")
                pixels = torch.nn.functional.interpolate(pixels, size=(h, w), mode="bilinear", align_corners=False)
            return pixels
    pixels = torch.stack([resize_center_crop(img, h, w) for img in images])
    if teacher.hf is not None and c == 3:
        note(f"note: {where}: the model directory has no image processor (preprocessor_config.json); images are "
             "resized, centre-cropped and normalised with the ImageNet mean and std")  # fmt: skip
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (pixels - mean) / std
    note(f"note: {where}: {teacher.label} defines no preprocess(image); images are resized, centre-cropped and "
         "scaled to [0, 1] without normalisation. If the teacher expects normalised inputs, define "
         "preprocess(image) -> [C, H, W] tensor in its file")  # fmt: skip
    return pixels


def _image_processor(path: str | Path) -> Any:
    if not (Path(path) / "preprocessor_config.json").is_file():
        return None
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, ImportError):  # a processor that needs extras: use the plain transform
        return None


def _text_batches(
    teacher: Teacher, texts: list[str], batch_size: int, num_batches: int, seq_len: int
) -> Callable[[], Iterator[dict[str, Any]]]:
    assert teacher.hf is not None  # callers checked
    tokenizer = load_tokenizer(teacher.hf["path"])
    if tokenizer is None:
        raise InputError(f"{teacher.spec}: the model directory has no tokenizer to calibrate with; give --calib FILE.py:FN")
    module = teacher.module
    bound = max_positions(getattr(module, "config", None))
    seq_len = min(seq_len, bound[1]) if bound else seq_len  # a longer batch would overrun the position embedding

    if teacher.hf.get("task") == "text-generation":  # a causal LM reads prose in windows, not padded lines
        def windows() -> Iterator[dict[str, Any]]:
            return islice(packed_windows(tokenizer, texts, module, seq_len, batch_size), num_batches)

        return windows

    def batches() -> Iterator[dict[str, Any]]:
        for i in range(num_batches):
            chunk = texts[i * batch_size : (i + 1) * batch_size]
            if not chunk:
                return
            yield tokenize(tokenizer, chunk, module, seq_len)

    return batches
