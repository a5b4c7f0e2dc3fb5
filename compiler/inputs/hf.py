"""What makes a module a Hugging Face model, in one place.

A ``transformers.PreTrainedModel`` carries a ``config`` (a ``PretrainedConfig``: ``to_dict``) and
``save_pretrained``. Pruning keeps such a model describable by its config, distillation reads its
hidden states through the config, and the record pass writes ``hf/`` for it.

Which Auto class and task a saved model has (``hf_task``: from transformers' registry), and the
inputs a class takes besides token ids and pixels: a waveform or spectrogram from its
``main_input_name`` and processor (``signal_inputs``), and ``decoder_input_ids`` for an
encoder-decoder (``with_decoder_inputs``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError


def is_hf(model: Any) -> bool:
    """True for a Hugging Face model (not a wrapper such as DDP: unwrap it first).

    >>> import torch
    >>> is_hf(torch.nn.Linear(2, 2))
    False
    """
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "to_dict") and hasattr(model, "save_pretrained")


#: (transformers registry mapping, task, Auto class): a class is matched by name, first match wins,
#: so a head class (``BertForQuestionAnswering``) loads as itself rather than as its base model
HF_AUTO_TASKS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation", "AutoModelForCausalLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification", "AutoModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering", "AutoModelForQuestionAnswering"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification", "AutoModelForImageClassification"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio-classification", "AutoModelForAudioClassification"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask", "AutoModelForMaskedLM"),
    ("MODEL_MAPPING_NAMES", "feature-extraction", "AutoModel"),
)
#: classes outside the registry: by the suffix of their name
HF_SUFFIX_TASKS = (
    ("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("ForImageClassification", "image-classification", "AutoModelForImageClassification"),
)
HF_BASE = ("feature-extraction", "AutoModel")


def hf_task(architectures: Sequence[str] | None) -> tuple[str, str]:
    """(task, Auto class name) for a config's ``architectures`` list, from transformers' own
    auto-class registry (so every head transformers ships maps to the Auto class that builds it).

    >>> hf_task(["LlamaForCausalLM"])
    ('text-generation', 'AutoModelForCausalLM')
    >>> hf_task(["BertForQuestionAnswering"])
    ('question-answering', 'AutoModelForQuestionAnswering')
    >>> hf_task(["BertModel"])
    ('feature-extraction', 'AutoModel')
    """
    mappings: list[tuple[Any, str, str]] = []
    try:
        import transformers.models.auto.modeling_auto as auto

        mappings = [(getattr(auto, m, {}), task, name) for m, task, name in HF_AUTO_TASKS]
    except ImportError:
        pass
    for arch in architectures or ():
        for mapping, task, auto_name in mappings:
            for names in mapping.values():
                if arch == names or (isinstance(names, tuple) and arch in names):
                    return task, auto_name
        for suffix, task, auto_name in HF_SUFFIX_TASKS:
            if arch.endswith(suffix):
                return task, auto_name
    return HF_BASE


def accepts(model: Any, name: str) -> bool:
    """True when ``model.forward`` takes a keyword ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


#: seconds of audio in a waveform example (``input_values``) when no processor says otherwise
AUDIO_SECONDS = 1.0


def signal_inputs(model: Any, config: Any, main: str, path: Path | None = None) -> dict[str, torch.Tensor]:
    """Example inputs of a model whose ``main_input_name`` is a signal, not tokens or pixels:
    ``input_values`` (a waveform ``[1, samples]``: one second at the processor's sampling rate,
    16 kHz without one) or ``input_features`` (a spectrogram ``[1, bins, frames]``: the
    processor's ``feature_size`` and ``nb_max_frames`` where it has them, else the config's
    ``num_mel_bins`` and ``2 * max_source_positions`` frames, the length Whisper's encoder takes).
    Raises ``InputError`` for any other name."""
    gen = torch.Generator().manual_seed(0)
    processor = _feature_extractor(path) if path is not None else {}
    if main == "input_values":
        rate = int(processor.get("sampling_rate") or 16000)
        return {main: torch.randn(1, int(rate * AUDIO_SECONDS), generator=gen)}
    if main == "input_features":
        bins = int(processor.get("feature_size") or getattr(config, "num_mel_bins", 0) or 80)
        frames = int(processor.get("nb_max_frames") or 2 * int(getattr(config, "max_source_positions", 0) or 50))
        return {main: torch.randn(1, bins, frames, generator=gen)}
    raise InputError(f"{type(model).__name__} takes '{main}' as its main input, for which potstill builds no "
                     "example: give the teacher as file.py:FACTORY with example_inputs()")


def _feature_extractor(path: Path) -> dict[str, Any]:
    """The saved ``preprocessor_config.json`` (a feature extractor's sizes), or {}."""
    file = Path(path) / "preprocessor_config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def with_decoder_inputs(model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``decoder_input_ids`` for an encoder-decoder that takes them (T5, BART,
    Marian, Whisper...): the encoder's token ids shifted right behind the decoder start token (half
    as many for a signal encoder), so both stacks run, and both are captured and pruned."""
    config = getattr(model, "config", None)
    if (config is None or not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in kwargs
            or not accepts(model, "decoder_input_ids")):
        return kwargs
    start = getattr(config, "decoder_start_token_id", None)
    start = int(start if start is not None else (getattr(config, "pad_token_id", None) or 0))
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        dec = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
    else:
        batch = next(iter(v for v in kwargs.values() if isinstance(v, torch.Tensor))).shape[0]
        dec = torch.full((batch, 8), start, dtype=torch.long)
    return {**kwargs, "decoder_input_ids": dec}
