"""The registry sweep's parts: which classes transformers ships per auto task, a tiny config for
any of them, the reference inputs a class takes, and one class through the real compile.

``tiny_config(model_type)`` shrinks the config class's own defaults by field name (hidden sizes to
64, FFN sizes to 128, two layers, four heads, two KV heads, vocabulary 256, images 32 px, lists of
stage widths and depths, experts, audio feature extractors), recursing into sub-configs. It is a
heuristic: a class whose shrunk config does not run in eager mode is reported as ``config`` /
``eager`` and stays outside the coverage bar. ``python -m zoo_sweep_lib TASK MODEL_TYPE CLASS``
runs one class and prints a ``ZOO_ROW {json}`` line (``bench/zoo_sweep.py`` runs it per class in
a child process with a time cap; ``tests/compiler/test_zoo_sweep.py`` runs a sample in process).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: auto task -> the registry mapping of transformers.models.auto.modeling_auto
TASKS: dict[str, str] = {
    "base": "MODEL_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq-cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token-cls": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "qa": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "image-cls": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "audio-cls": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
#: statuses outside the coverage bar: the class itself does not run or export on the shrunk config
OUTSIDE = ("config", "eager", "export")
#: the MACs cut a passing class must reach at ratio 0.5
MIN_CUT = 0.2


def registry(tasks: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(task, model_type, class name) for every class of the tasks, interleaved across tasks so
    that a run cut short still covers each of them (a seeded shuffle within each task)."""
    import random

    import transformers.models.auto.modeling_auto as auto

    per_task: list[list[tuple[str, str, str]]] = []
    for task in tasks or list(TASKS):
        rows: list[tuple[str, str, str]] = []
        for model_type, names in getattr(auto, TASKS[task]).items():
            for name in (names,) if isinstance(names, str) else tuple(names)[:1]:
                rows.append((task, model_type, name))
        random.Random(0).shuffle(rows)  # a run cut short is a fair sample, not the families from A to C
        per_task.append(rows)
    out: list[tuple[str, str, str]] = []
    for i in range(max((len(r) for r in per_task), default=0)):
        out += [r[i] for r in per_task if i < len(r)]
    return out


# ---------------------------------------------------------------------------------------------
# Tiny configs

HIDDEN = {"hidden_size", "d_model", "n_embd", "dim", "embed_dim", "word_embed_proj_dim", "embedding_size",
          "d_embed", "n_embed", "model_dim", "hidden_dim_text", "projection_dim", "text_embed_dim",
          "vision_embed_dim", "encoder_hidden_size", "decoder_hidden_size", "cross_attention_hidden_size",
          "embedding_dim", "hidden_size_per_layer_input", "vocab_size_per_layer_input", "audio_embed_dim"}
FFN = {"intermediate_size", "ffn_dim", "n_inner", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "d_inner",
       "decoder_intermediate_size", "ffn_hidden_size", "inner_dim", "mlp_dim", "intermediate_dim"}
SMALL_FFN = {"moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"}
LAYERS = re.compile(r"^(num_(hidden_|encoder_|decoder_)?layers|n_layers?|num_layers|encoder_layers|decoder_layers|"
                    r"num_hidden_groups_layers|n_layer|num_blocks|depth|num_decoder_layers|num_encoder_layers|"
                    r"num_transformer_layers|text_layers|vision_layers)$")
HEADS = {"num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
         "num_heads", "attention_heads", "num_attention_heads_text"}
KV_HEADS = {"num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv",
            "num_query_groups"}
HEAD_DIM = {"head_dim", "d_kv", "kv_channels", "attention_head_size", "qk_nope_head_dim", "v_head_dim",
            "qk_rope_head_dim", "d_head", "kv_lora_rank", "q_lora_rank"}
POSITIONS = {"max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "n_ctx",
             "max_source_positions", "max_target_positions", "seq_length"}
EXPERTS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_layer"}
EXPERTS_PER_TOKEN = {"num_experts_per_tok", "moe_topk", "num_selected_experts", "router_top_k"}


def _shrink_value(key: str, value: Any, defaults: dict[str, Any]) -> Any:
    """The tiny value of one config field (unchanged where no rule applies)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if key in HIDDEN and value > 64:
            return 64
        if key in FFN and value > 128:
            return 128
        if key in SMALL_FFN and value > 32:
            return 32
        if LAYERS.match(key) and value > 2:
            return 2
        if key in HEADS and value > 4:
            return 4
        if key in KV_HEADS and value > 1:
            heads = next((int(defaults[h]) for h in HEADS if isinstance(defaults.get(h), int)), value)
            return 4 if value >= heads else 2
        if key in HEAD_DIM and value > 16:
            return 16
        if key == "vocab_size" and value > 256:
            return 256
        if key in POSITIONS and value > 128:
            return 128
        if key in EXPERTS and value > 4:
            return 4
        if key in EXPERTS_PER_TOKEN and value > 2:
            return 2
        if key == "image_size" and value > 32:
            return 32
        if key == "patch_size" and value > 8:
            return 8
        if key in ("num_conv_pos_embeddings",) and value > 16:
            return 16
        if key in ("num_labels",):
            return 3
        if key in ("state_size", "d_state", "ssm_state_size") and value > 16:
            return 16
        if key in ("time_step_rank", "dt_rank") and value > 8:
            return 8
        if key in ("num_mel_bins", "feature_size") and value > 16 and key == "num_mel_bins":
            return 16
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if key in ("depths", "num_layers", "layers", "block_repeats", "depth") or key.endswith("depths"):
            return [1 for _ in value]
        if key in ("hidden_sizes", "embed_dims", "embed_dim", "hidden_size", "dims", "channels", "widths",
                   "num_channels", "conv_dim", "out_features", "in_channels", "out_channels", "filter_sizes",
                   "hidden_dims", "stage_channels", "decoder_hidden_size"):
            if key == "conv_dim":
                return [32] * len(value)
            # one function of the value for every list, so that in_channels[i + 1] == out_channels[i] holds
            return [max(8, -(-v // 32) * 8) for v in value]
        if key in ("num_heads", "num_attention_heads", "heads", "attention_heads"):
            return [min(v, 2) for v in value]
    return value


def shrink_config(config: Any) -> Any:
    """Shrink ``config`` in place (sub-configs too) and return it."""
    from transformers import PretrainedConfig

    values = config.to_dict()
    layers_before = {k: v for k, v in vars(config).items() if isinstance(v, int) and LAYERS.match(k)}
    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            shrink_config(value)
            continue
        new = _shrink_value(key, value, values)
        if new is not value:
            with contextlib.suppress(AttributeError, ValueError):
                setattr(config, key, new)
    for key, before in layers_before.items():  # per-layer lists (layer_types, ...) follow the layer count
        after = getattr(config, key)
        for name, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == before and before != after and not LAYERS.match(name):
                setattr(config, name, value[:after])
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        for key, value in list(vars(config).items()):
            if key.endswith("token_id") and isinstance(value, int) and value >= vocab:
                setattr(config, key, min(vocab - 1, 2))
    for key in ("use_cache",):
        if hasattr(config, key):
            setattr(config, key, False)
    return config


def tiny_config(model_type: str) -> Any:
    """The config class's defaults for ``model_type``, shrunk."""
    from transformers import CONFIG_MAPPING

    return shrink_config(CONFIG_MAPPING[model_type]())


def build_tiny(model_type: str, class_name: str, seed: int = 0) -> torch.nn.Module:
    """The class built from ``tiny_config`` with random weights (BatchNorm statistics randomised, so
    a CNN's outputs are not ~0 and parity is not vacuous), in eval mode."""
    import transformers

    cls = getattr(transformers, class_name)
    config = tiny_config(model_type)
    config.architectures = [class_name]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_var is not None:
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------------------------
# Reference inputs (independent of potstill's own builder, so a wrong input there is a failure)


def reference_inputs(model: torch.nn.Module, batch: int = 1, seq: int = 16, seed: int = 0) -> dict[str, Any]:
    """Inputs from the class's ``main_input_name`` and signature: token ids, pixels, waveforms or
    spectrogram features, plus ``decoder_input_ids`` for an encoder-decoder."""
    import inspect

    config = model.config
    gen = torch.Generator().manual_seed(seed)
    main = getattr(model, "main_input_name", "input_ids")
    params = inspect.signature(model.forward).parameters
    out: dict[str, Any] = {}
    if main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else int(size[0])
        out[main] = torch.randn(batch, int(getattr(config, "num_channels", 3)), size, size, generator=gen)
    elif main == "input_values":
        out[main] = torch.randn(batch, 1600 + 160 * seq, generator=gen)
    elif main == "input_features":
        mels = int(getattr(config, "num_mel_bins", getattr(config, "feature_size", 80)))
        out[main] = torch.randn(batch, mels, 2 * seq if "whisper" not in config.model_type else
                                2 * int(getattr(config, "max_source_positions", 1500)), generator=gen)
    else:
        vocab = int(getattr(config, "vocab_size", 256) or 256)
        out["input_ids"] = torch.randint(3, min(vocab, 200), (batch, seq), generator=gen)
        if "attention_mask" in params:
            out["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
        vocab = int(getattr(config, "vocab_size", 256) or 256)
        out["decoder_input_ids"] = torch.randint(3, min(vocab, 200), (batch, max(4, seq // 2)), generator=gen)
    return out


# ---------------------------------------------------------------------------------------------
# One class


def classify(message: str) -> str:
    """A failure's kind from its message."""
    m = message.lower()
    rules = (
        ("nothing-prunable", ("no prunable", "nothing to prune", "removes no aligned", "at their floor")),
        ("capture", ("could not capture", "torch.export", "export(")),
        # an engine fixed at the compile's length (the exporter kept no symbolic sequence axis)
        ("fixed-shape", ("got invalid dimensions",)),
        ("inputs", ("input_ids", "pixel_values", "input_values", "decoder_input_ids", "unexpected keyword",
                    "missing", "required positional")),
        ("attribute", ("has no attribute",)),
        ("lowering", ("onnx", "exporter", "lower")),
        ("parity", ("parity", "differs", "mismatch")),
        ("reload", ("load_student", "record", "reload")),
    )
    for kind, keys in rules:
        if any(k in m for k in keys):
            return kind
    return "other"


def _first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " / ".join(lines[:2])[:400]


def _flat_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    from potstill.targets.onnx_export import ordered_outputs

    names, tensors, _ = ordered_outputs(out)
    return list(zip(names, tensors))


def sweep_class(task: str, model_type: str, class_name: str, root: Path, ratio: float = 0.5) -> dict[str, Any]:
    """One class: reference eager + export, the real compile, reload, engine parity on every output."""
    row: dict[str, Any] = {"task": task, "model_type": model_type, "class": class_name}
    try:
        model = build_tiny(model_type, class_name)
    except Exception as e:
        return {**row, "status": "config", "kind": "config", "reason": _first_line(e)}
    ref = reference_inputs(model)
    try:
        with torch.no_grad():
            model(**ref)
    except Exception as e:
        return {**row, "status": "eager", "kind": "eager", "reason": _first_line(e)}
    try:
        torch.export.export(model, (), dict(ref), strict=False)
    except Exception as e:
        return {**row, "status": "export", "kind": "export", "reason": _first_line(e)}
    path = root / "teacher"
    model.save_pretrained(path)
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except Exception as e:  # the shrunk config does not survive its own save/load: the heuristic's fault
        return {**row, "status": "config", "kind": "config", "reason": _first_line(e)}
    out = root / "out"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from potstill.cli import main as cli_main

    buf = io.StringIO()
    argv = ["compile", f"hf:{path}", "--out", str(out), "--ratio", str(ratio), "--no-distill", "--json"]
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            rc = cli_main(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    except Exception as e:
        return {**row, "status": "potstill", "kind": classify(str(e)), "reason": _first_line(e)}
    if rc != 0:
        text = buf.getvalue()
        err = ""
        for line in text.splitlines():
            if line.startswith("{") and '"error"' in line:
                try:
                    err = json.loads(line)["error"]
                except ValueError:
                    err = line
        err = err or (text.strip().splitlines() or [f"exit {rc}"])[-1]
        return {**row, "status": "potstill", "kind": classify(err), "reason": f"exit {rc}: {err[:400]}"}
    try:
        return {**row, **check_student(out, path, model, ref)}
    except Exception as e:
        return {**row, "status": "potstill", "kind": classify(str(e)), "reason": _first_line(e)}


def check_student(out: Path, teacher_dir: Path, teacher: torch.nn.Module, ref: dict[str, Any]) -> dict[str, Any]:
    """Reload the student, feed it and its ONNX engine inputs of another batch and length, compare
    every output the engine names (in the model's order) and the MACs cut."""
    import numpy as np
    import onnxruntime as ort
    from potstill.outputs.students_io import load_student

    man = json.loads((out / "manifest.json").read_text())
    t, s = man["teacher"], man["students"][0]
    student_dir = out / s["dir"]
    cut = 1.0 - s["macs"] / t["macs"] if t["macs"] else 0.0
    reloaded = load_student(student_dir)
    fresh = reference_inputs(teacher, batch=2, seq=11, seed=3)
    session = ort.InferenceSession(str(student_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for spec in session.get_inputs():  # an image engine is fixed at the size potstill compiled for (the
        # config's image_size, else 224): pixels of that size, batch still another than the compile's
        pixels = fresh.get(spec.name)
        if spec.name == "pixel_values" and isinstance(pixels, torch.Tensor) and len(spec.shape) == pixels.dim():
            size = [d if isinstance(d, int) and i >= 2 else pixels.shape[i] for i, d in enumerate(spec.shape)]
            if list(pixels.shape) != size:
                fresh[spec.name] = torch.randn(size, generator=torch.Generator().manual_seed(3))
    for name in names:  # inputs the engine takes beyond the class's main ones: their neutral values
        like = fresh.get("input_ids", next(iter(fresh.values())))
        if name in fresh:
            continue
        if name.endswith("attention_mask"):
            fresh[name] = torch.ones(like.shape[:2], dtype=torch.long)
        elif name == "token_type_ids":
            fresh[name] = torch.zeros(like.shape[:2], dtype=torch.long)
        elif name == "position_ids":
            fresh[name] = torch.arange(like.shape[1]).expand(like.shape[0], -1).contiguous()
    missing = [n for n in names if n not in fresh]
    if missing:
        raise AssertionError(f"engine inputs {missing} are not among the class's inputs {sorted(fresh)}")
    with torch.no_grad():
        expect = _flat_outputs(reloaded(**{k: v for k, v in fresh.items() if k in names}))
    outs = [o.name for o in session.get_outputs()]
    got = session.run(outs, {k: fresh[k].numpy() for k in names})
    by_name = dict(expect)
    worst = 0.0
    for name, value in zip(outs, got):
        if name not in by_name:
            raise AssertionError(f"engine output {name} is not among the student's outputs {list(by_name)}")
        want = by_name[name].numpy()
        if value.shape != want.shape:
            raise AssertionError(f"parity: engine output {name} {value.shape} vs student {want.shape}")
        if not np.isfinite(value).all():
            raise AssertionError(f"parity: engine output {name} is not finite")
        err = float(np.abs(value - want).max()) / max(1.0, float(np.abs(want).max()))
        worst = max(worst, err)
    if worst > 1e-3:
        raise AssertionError(f"parity: engine differs from the reloaded student by {worst:.3g} (relative)")
    status = "pass" if cut >= MIN_CUT else "low-cut"
    row: dict[str, Any] = {"status": status, "cut": round(cut, 3), "engine_rel": worst, "outputs": outs}
    if status != "pass":
        row["kind"] = "low-cut"
        pinned = t["architecture"].get("pinned") or []
        row["reason"] = f"{cut:.0%} of MACs removed; pinned: {str(pinned)[:300]}"
    return row


def main(argv: Sequence[str]) -> None:
    task, model_type, class_name = argv
    with tempfile.TemporaryDirectory() as d:
        try:
            row = sweep_class(task, model_type, class_name, Path(d))
        except Exception as e:  # the row is the point: one line per class
            traceback.print_exc()
            row = {"task": task, "model_type": model_type, "class": class_name, "status": "potstill",
                   "kind": classify(str(e)), "reason": _first_line(e)}
    print("ZOO_ROW " + json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
