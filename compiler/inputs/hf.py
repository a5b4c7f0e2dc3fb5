"""What makes a module a Hugging Face model, in one place.

A ``transformers.PreTrainedModel`` carries a ``config`` (a ``PretrainedConfig``: ``to_dict``) and
``save_pretrained``. Pruning keeps such a model describable by its config, distillation reads its
hidden states through the config, and the record pass writes ``hf/`` for it.
"""

from __future__ import annotations

from typing import Any


def is_hf(model: Any) -> bool:
    """True for a Hugging Face model (not a wrapper such as DDP: unwrap it first).

    >>> import torch
    >>> is_hf(torch.nn.Linear(2, 2))
    False
    """
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "to_dict") and hasattr(model, "save_pretrained")
