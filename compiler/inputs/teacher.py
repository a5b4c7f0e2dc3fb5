"""Load a teacher and its example inputs from what a user types on the command line.

Two spellings:

* ``path/to/file.py:FACTORY`` — ``FACTORY()`` returns an ``nn.Module``. Example inputs come from
  an ``example_inputs()`` function in the same file, or from ``--input-shape 1x3x224x224`` given
  once per (float) input. The file may also define ``calib_data``, ``train_data``, ``eval_data``
  and ``metric``; they become the compilation's defaults.
* ``hf:PATH`` — a Hugging Face model directory. The task is read from ``config.architectures``
  (``…ForCausalLM``, ``…ForSequenceClassification``, ``…ForImageClassification``, else the base
  model) and the task's standard inputs are built: token ids of real sentences for text (with the
  directory's tokenizer when it has one), ``pixel_values`` for vision.

``load_calibration`` picks the calibration batches: a ``FILE.py:FN``, a folder of images (image
models; the teacher file may define ``preprocess(image)``), the teacher file's ``calib_data``, or for
text models a tokenizer over a text file or, by default, the docstrings of installed packages.
``load_data`` reads ``--data`` the same way.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from potstill.inputs.corpus import is_text_file, read_texts
from potstill.inputs.data import image_files, import_file, load_callable, load_image
from potstill.inputs.hf import accepts, hf_task, signal_inputs, with_decoder_inputs
from potstill.inputs.hf_files import (
    check_sequence_length,
    check_tokenizer_files,
    check_weight_files,
    max_positions,
    remote_code_note,
    tokenizer_fix,
)
from torch import nn

#: Real sentences for the example inputs of text models (not a benchmark: shapes and realism).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Compilers translate programs written in one language into another language.",
    "A small model that runs fast on the device is often better than a large one that does not.",
    "She planted tomatoes in the garden before the first rain of spring.",
)

#: Hooks a teacher file may define; they become the defaults of a compilation.
TEACHER_HOOKS = ("calib_data", "train_data", "eval_data", "metric", "preprocess")



@dataclass
class Teacher:
    """A loaded teacher: the module (eval mode), its example inputs and where it came from."""

    module: nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    #: {"path", "task", "auto_class"} for Hugging Face teachers, else None
    hf: dict[str, Any] | None = None
    #: short name for tables and the manifest, e.g. ``digits_cnn.py:teacher`` or ``hf:all-MiniLM-L6-v2``
    label: str = "teacher"
    spec: str = ""
    #: files that define the teacher (the .py file, or the HF directory's files), for hashes
    sources: list[Path] = field(default_factory=list)
    #: optional functions from the teacher file: calib_data, train_data, eval_data, metric, preprocess
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``.

    >>> parse_input_shape("1x3x32x32")
    (1, 3, 32, 32)
    """
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"--input-shape '{text}': expected positive sizes joined by 'x', e.g. 1x3x224x224")
    return dims


def load_teacher(
    spec: str,
    input_shapes: Sequence[str] = (),
    seed: int = 0,
    default_shapes: Sequence[str] = (),
    *,
    sequence_length: int | None = None,
    trust_remote_code: bool = False,
    note: Callable[[str], None] = print,
) -> Teacher:
    """Load ``path/to/file.py:FACTORY`` or ``hf:PATH`` (see the module docstring).

    ``default_shapes`` (the profile's input shapes) serve a file without ``example_inputs()`` when
    no ``--input-shape`` is given. ``sequence_length`` (text teachers) sets the example inputs'
    token count, which is the timing shape; ``trust_remote_code`` (``--trust-remote-code``) lets a
    Hugging Face folder's own Python run, which potstill never does otherwise.
    """
    if spec.startswith("hf:"):
        if input_shapes:
            raise InputError(f"'{spec}': --input-shape does not apply to Hugging Face teachers; "
                             "text teachers take --sequence-length, vision teachers use the config's image_size")
        return load_hf_teacher(spec[3:], sequence_length=sequence_length, trust_remote_code=trust_remote_code,
                               note=note)
    if trust_remote_code:
        raise InputError(f"'{spec}': --trust-remote-code applies to Hugging Face teachers (hf:PATH) only")
    if sequence_length is not None:
        raise InputError(f"'{spec}': --sequence-length applies to Hugging Face text teachers (hf:PATH) only; "
                         "give --input-shape or example_inputs()")
    return load_file_teacher(spec, input_shapes, seed, default_shapes)


# ---------------------------------------------------------------------------------------------
# path/to/file.py:FACTORY


def load_file_teacher(
    spec: str, input_shapes: Sequence[str] = (), seed: int = 0, default_shapes: Sequence[str] = ()
) -> Teacher:
    path_text, sep, factory_name = spec.rpartition(":")
    if not sep or not path_text or not factory_name:
        hint = f" (it is a directory: did you mean hf:{spec}?)" if Path(spec).is_dir() else ""
        raise InputError(f"teacher '{spec}': expected path/to/file.py:FACTORY or hf:PATH{hint}")
    path = Path(path_text)
    if path.is_dir():
        raise InputError(f"teacher '{spec}': {path} is a directory; for a Hugging Face model write hf:{path}")
    if path.suffix != ".py":
        raise InputError(f"teacher '{spec}': {path} is not a Python file; expected path/to/file.py:FACTORY")
    module_file = import_file(path)
    factory = load_callable(spec)
    try:
        model = factory()
    except Exception as e:
        raise InputError(f"teacher '{spec}': {factory_name}() raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise InputError(
            f"teacher '{spec}': {factory_name}() returned a {type(model).__name__}; it must return a torch.nn.Module"
        )
    hooks = {name: fn for name in TEACHER_HOOKS if callable(fn := getattr(module_file, name, None))}
    args, kwargs = _file_inputs(spec, path, module_file, input_shapes or default_shapes, seed)
    return Teacher(
        module=model.eval(),
        example_inputs=args,
        example_kwargs=kwargs,
        label=f"{path.name}:{factory_name}",
        spec=spec,
        sources=[path.resolve()],
        hooks=hooks,
    )


def _file_inputs(
    spec: str, path: Path, module_file: Any, input_shapes: Sequence[str], seed: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    fn = getattr(module_file, "example_inputs", None)
    if input_shapes:
        gen = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(parse_input_shape(s), generator=gen) for s in input_shapes), {}
    if not callable(fn):
        raise InputError(
            f"teacher '{spec}': no example inputs. Add to {path}:\n"
            "    def example_inputs():\n"
            "        return (torch.randn(1, 3, 224, 224),)\n"
            "or pass --input-shape 1x3x224x224 (once per input)"
        )
    try:
        value = fn()
    except Exception as e:
        raise InputError(f"{path}: example_inputs() raised {type(e).__name__}: {e}") from e
    return _split_inputs(value, f"{path}: example_inputs()")


def _split_inputs(value: Any, where: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tensor, a tuple/list of inputs, a dict of keyword inputs, or an (args, kwargs) pair."""
    if isinstance(value, torch.Tensor):
        return (value,), {}
    if isinstance(value, dict):
        return (), dict(value)
    if isinstance(value, (tuple, list)):
        if len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], dict):
            return tuple(value[0]), dict(value[1])
        return tuple(value), {}
    raise InputError(
        f"{where} returned a {type(value).__name__}; return a tensor, a tuple of tensors or a dict of keyword inputs"
    )


# ---------------------------------------------------------------------------------------------
# hf:PATH


#: token count of a text teacher's example inputs (the timing shape) unless --sequence-length says
DEFAULT_SEQUENCE_LENGTH = 32


def load_hf_teacher(path_text: str, *, sequence_length: int | None = None, trust_remote_code: bool = False,
                    note: Callable[[str], None] = print) -> Teacher:
    """A Hugging Face model folder as a teacher. Never runs the folder's own Python unless
    ``trust_remote_code`` (``--trust-remote-code``) is set: ``trust_remote_code=False`` is passed to
    every ``from_pretrained``, so a config with ``auto_map`` neither prompts nor runs code (the
    console says the built-in class is used). A corrupt weight, config or tokenizer file is an
    ``InputError`` naming the file (``potstill.inputs.hf_files``)."""
    spec = f"hf:{path_text}"
    path = Path(path_text)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise InputError(
            f"teacher '{spec}': {path} {what}; give a local Hugging Face model directory "
            "(one written by save_pretrained), e.g. hf:./models/my-bert"
        )
    if sequence_length is not None and not 1 <= sequence_length <= 1 << 16:
        raise InputError(f"--sequence-length {sequence_length}: give a token count between 1 and 65536")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError as e:
        raise InputError(f"teacher '{spec}' needs transformers: pip install 'potstill[hf]'") from e

    config = _hf_config(transformers, path, spec, trust_remote_code, note)
    check_sequence_length(config, sequence_length, spec)
    check_weight_files(path, spec)
    check_tokenizer_files(path, spec)
    task, auto_name = hf_task(getattr(config, "architectures", None))
    auto_class = getattr(transformers, auto_name)
    config.use_cache = False
    config.return_dict = True
    model = _hf_from_pretrained(auto_class, path, config, spec, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, spec=spec)
    main = getattr(model, "main_input_name", "input_ids")
    if sequence_length is not None and main != "input_ids":
        raise InputError(f"teacher '{spec}': --sequence-length applies to text models; this one takes {main}")
    bound = max_positions(config)
    default = min(DEFAULT_SEQUENCE_LENGTH, bound[1]) if bound else DEFAULT_SEQUENCE_LENGTH
    kwargs = _hf_example_inputs(model, config, tokenizer, sequence_length or default, path)
    sources = sorted(p.resolve() for p in path.iterdir() if p.is_file())
    return Teacher(
        module=model.eval(),
        example_inputs=(),
        example_kwargs=kwargs,
        hf={"path": str(path.resolve()), "task": task, "auto_class": auto_name},
        label=hf_label(path),
        spec=spec,
        sources=sources,
    )


def hf_label(path: Path) -> str:
    """``hf:NAME`` with the directory's name, or its parent's when the name is a generic one."""
    path = path.resolve()
    generic = {"model", "models", "hf", "checkpoint", "snapshot"}
    return f"hf:{path.parent.name}/{path.name}" if path.name.lower() in generic else f"hf:{path.name}"


def _hf_config(transformers: Any, path: Path, spec: str, trust_remote_code: bool, note: Callable[[str], None]) -> Any:
    """The folder's config, checked before any weights are read: valid JSON, a known
    ``model_type``, and no ``auto_map`` code unless the user opted in."""
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"teacher '{spec}': {cfg_path} is not valid JSON ({e}); re-save it with save_pretrained") from e
    if not isinstance(raw, dict):
        raise InputError(f"teacher '{spec}': {cfg_path} must hold a JSON object, found {type(raw).__name__}")
    model_type = raw.get("model_type")
    known = transformers.CONFIG_MAPPING
    remote = "auto_map" in raw
    if not isinstance(model_type, str) or not model_type:
        raise InputError(f"teacher '{spec}': {cfg_path} has no 'model_type' field; it names the architecture "
                         "(e.g. \"bert\", \"llama\")")
    if model_type not in known and not (remote and trust_remote_code):
        hint = (" Its 'auto_map' names Python code in the folder: potstill runs it only with --trust-remote-code."
                if remote else " Upgrade transformers or give a supported model.")
        raise InputError(f"teacher '{spec}': {cfg_path} field 'model_type' is '{model_type}', which this transformers "
                         f"({transformers.__version__}) does not know.{hint}")
    remote_note = remote_code_note(raw, spec, trust_remote_code)
    if remote_note:
        note(remote_note)
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise InputError(f"teacher '{spec}': {cfg_path} field 'architectures' must be a list of class names")
    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise InputError(f"teacher '{spec}': {cfg_path} is not a valid {model_type} config: {type(e).__name__}: "
                         f"{first}") from e


def _hf_from_pretrained(auto_class: Any, path: Path, config: Any, spec: str, trust_remote_code: bool) -> nn.Module:
    errors = []
    for attn in ("sdpa", "eager"):
        try:
            return auto_class.from_pretrained(path, config=config, attn_implementation=attn,
                                              trust_remote_code=trust_remote_code)
        except (ValueError, ImportError) as e:
            if "attn" in str(e).lower() or "attention implementation" in str(e).lower() or "sdpa" in str(e).lower():
                errors.append(f"{attn}: {e}")  # the architecture does not support this attention: try the next
                continue
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise InputError(f"teacher '{spec}': {auto_class.__name__} cannot build it from {path / 'config.json'}: "
                             f"{type(e).__name__}: {first}") from e
        except (OSError, OverflowError) as e:
            raise InputError(f"teacher '{spec}': cannot load the weights in {path}: {type(e).__name__}: {e}; "
                             "download or save_pretrained the model again") from e
        except (RuntimeError, TypeError, KeyError) as e:  # weights that do not fit the config, bad fields
            first = (str(e).strip().splitlines() or [""])[-1][:300]
            raise InputError(f"teacher '{spec}': {auto_class.__name__} cannot build it from {path / 'config.json'}: "
                             f"{type(e).__name__}: {first}") from e
    raise InputError(f"teacher '{spec}': {auto_class.__name__} could not load it ({'; '.join(errors)})")


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


def _hf_example_inputs(model: nn.Module, config: Any, tokenizer: Any, seq_len: int = 32,
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


# ---------------------------------------------------------------------------------------------
# Calibration data


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

    def batches() -> Iterator[dict[str, Any]]:
        for i in range(num_batches):
            chunk = texts[i * batch_size : (i + 1) * batch_size]
            if not chunk:
                return
            yield tokenize(tokenizer, chunk, module, seq_len)

    return batches


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
