"""Load a teacher from what a user types on the command line, and make it one potstill compiles.

Two spellings:

* ``path/to/file.py:FACTORY`` — ``FACTORY()`` returns an ``nn.Module``. Example inputs come from
  an ``example_inputs()`` function in the same file, or from ``--input-shape 1x3x224x224`` given
  once per (float) input. The file may also define ``calib_data``, ``train_data``, ``eval_data``
  and ``metric``; they become the compilation's defaults.
* ``hf:PATH`` — a Hugging Face model directory. The task is read from ``config.architectures``
  (``…ForCausalLM``, ``…ForSequenceClassification``, ``…ForImageClassification``, else the base
  model) and the task's standard inputs are built (``potstill.inputs.hf_examples``).

``normalise_teacher`` then converts a teacher whose weights are neither float32 nor float16 to
float32, gives its sparse mixture-of-experts blocks a dispatch ``torch.export`` can capture
(``potstill.inputs.moe``) and refuses oversized example inputs; ``run_teacher_once`` checks it runs
on its example.
Calibration and training batches are read by ``potstill.inputs.calibration``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from potstill.inputs.corpus import docstring_corpus
from potstill.inputs.data import import_file, load_callable
from potstill.inputs.hf import hf_task
from potstill.inputs.hf_examples import DEFAULT_SEQUENCE_LENGTH, hf_example_inputs, load_tokenizer
from potstill.inputs.hf_files import (
    check_sequence_length,
    check_tokenizer_files,
    check_weight_files,
    max_positions,
    remote_code_note,
)
from torch import nn

# docstring_corpus and load_tokenizer live in potstill.inputs.corpus and .hf_examples; bench/real_teachers.py
# and potstill.outputs.students_io.save still import them from here
__all__ = [
    "MAX_INPUT_ELEMENTS",
    "TEACHER_HOOKS",
    "Teacher",
    "check_input_shapes",
    "docstring_corpus",
    "hf_label",
    "load_file_teacher",
    "load_hf_teacher",
    "load_teacher",
    "load_tokenizer",
    "normalise_teacher",
    "parse_input_shape",
    "run_teacher_once",
]

#: Hooks a teacher file may define; they become the defaults of a compilation.
TEACHER_HOOKS = ("calib_data", "train_data", "eval_data", "metric", "preprocess")

#: the most elements one example input may have (a typo such as 1x3x22400x22400 is refused up front)
MAX_INPUT_ELEMENTS = 1 << 28


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
    kwargs = hf_example_inputs(model, config, tokenizer, sequence_length or default, path)
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


# ---------------------------------------------------------------------------------------------
# A loaded teacher, made one potstill compiles


def normalise_teacher(teacher: Teacher, note: Callable[[str], None]) -> bool:
    """Dtype and input size, before any heavy work; True when the teacher was converted to float32."""
    dtypes = {p.dtype for p in teacher.module.parameters()} | {b.dtype for b in teacher.module.buffers() if b.is_floating_point()}
    odd = sorted(str(d) for d in dtypes if d.is_floating_point and d not in (torch.float32, torch.float16))
    if odd:
        note(f"note: the teacher's weights are {', '.join(odd)}; potstill compiles in float32 and converted them "
             "(engines and parity are float32)")  # fmt: skip
        teacher.module.float()
        teacher.example_inputs = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                       for a in teacher.example_inputs)  # fmt: skip
        teacher.example_kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                  for k, v in teacher.example_kwargs.items()}  # fmt: skip
    config = getattr(teacher.module, "config", None)
    if config is not None and getattr(config, "use_cache", None) is True:  # a file factory's HF model (hf: teachers are loaded without)
        note("note: the teacher's config has use_cache=True; potstill compiles the forward without a key/value "
             "cache (a cache object is no tensor a captured graph can return) and set it to False")  # fmt: skip
        config.use_cache = False
    _dense_moe(teacher.module, note)
    for i, a in enumerate(teacher.example_inputs):
        if isinstance(a, torch.Tensor) and a.numel() > MAX_INPUT_ELEMENTS:
            raise InputError(f"example input {i} has shape {tuple(a.shape)} ({a.numel():,} elements, more than "
                             f"{MAX_INPUT_ELEMENTS:,}); give a realistic --input-shape such as 1x3x224x224")  # fmt: skip
    return bool(odd)


def _dense_moe(module: nn.Module, note: Callable[[str], None]) -> None:
    """Sparse MoE blocks get the dense expert dispatch (``potstill.inputs.moe``), said once."""
    from potstill.inputs.moe import export_friendly_moe

    done = export_friendly_moe(module)
    if done:
        kinds = sorted({type(module.get_submodule(name)).__name__ for name in done})
        note(f"note: {len(done)} mixture-of-experts blocks ({', '.join(kinds)}) run every expert on every token "
             "and weight it by the router (zero where the token does not go): the same outputs, in a graph "
             "torch.export can capture (the sparse dispatch's shapes depend on the data)")  # fmt: skip


def check_input_shapes(shapes: Sequence[str]) -> None:
    """Each ``--input-shape`` parses and is of a realistic size, before anything is loaded."""
    for text in shapes:
        n = math.prod(parse_input_shape(text))
        if n > MAX_INPUT_ELEMENTS:
            raise InputError(f"--input-shape {text}: {n:,} elements, more than {MAX_INPUT_ELEMENTS:,}; "
                             "give a realistic shape such as 1x3x224x224")  # fmt: skip


def run_teacher_once(teacher: Teacher) -> Any:
    """Run the teacher on its example; an input it rejects is an InputError about the input."""
    try:
        with torch.no_grad():
            return teacher.module(*teacher.example_inputs, **teacher.example_kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shapes = [tuple(a.shape) for a in teacher.example_inputs if isinstance(a, torch.Tensor)]
        raise InputError(
            f"the teacher does not run on its example inputs {shapes}: {type(e).__name__}: {str(e).splitlines()[0][:300]}; "
            "check --input-shape (rank and sizes) or the file's example_inputs()"
        ) from e
