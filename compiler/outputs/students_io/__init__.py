"""Save and reload students without relying on what a Hugging Face config can express.

A student is its teacher's class with some blocks removed and some modules narrowed. We save

* ``model.safetensors``: every parameter and buffer of the student (tied tensors once; no pickle);
* ``architecture.json``: how to rebuild the module those tensors fit. The teacher's class (import
  path) and config (a Hugging Face config dict) or its factory (``file.py:FACTORY``), the blocks
  removed from each container (by the teacher's indices), every tensor's shape and dtype, the module
  attributes that differ from a freshly built teacher (``in_features``, ``out_channels``,
  ``groups``, ``num_heads``, ``num_key_value_heads``, ``head_dim``, ``all_head_size``, ...), the
  per-layer attention head counts, the student's config and the loaders the student supports.

Nothing in a student folder executes. The record names the teacher's class, but ``load_student``
resolves it only from an allow-list: a ``transformers.PreTrainedModel`` subclass found by name in
the ``transformers`` namespace, an ``nn.Module`` class of a module the caller has already imported,
or the ``model_class`` the caller passes; no module is imported because a record names it. A
factory teacher (``file.py:FACTORY``) is rebuilt only by the ``factory`` the caller passes; the
recorded spec is information, never imported. Every tensor's shape and dtype in
``model.safetensors`` is checked against the record (from the file's header) before any module
is built.

``load_student(dir)`` replays the record the way Model Optimizer's ``mto.restore`` replays its
``modelopt_state`` on a freshly built model: build the teacher's class from its config (or call the
caller's factory), drop the recorded blocks, set the recorded attributes, then give every tensor its saved
shape and values. ``hf/`` (``save_pretrained``) is written next to it only when plain
``AutoModel.from_pretrained`` rebuilds exactly these tensors, so the manifest's ``loaders`` list
is a checked promise, not a hope.

    >>> record = save_student(student, "out/students/r0.5", teacher={"spec": "hf:./bert", "hf": hf})
    >>> record["loaders"]
    ['potstill.load_student', 'transformers.AutoModel']
    >>> model = load_student("out/students/r0.5")
    >>> cnn = load_student("out/students/macs50", factory=my_module.teacher)  # a file.py:FACTORY teacher

The package: ``codec`` (the record's format), ``teacher`` (the teacher part and its allow-list),
``save`` (``save_student``, ``hf/``), ``load`` (``load_student``) and ``program``
(``student.pt2``: ``save_program``). Everything that writes or reads a student is here.
"""

from .codec import (
    LOADER_POTSTILL,
    RECORD_FILE,
    RECORD_FORMAT,
    RECORD_VERSION,
    WEIGHTS_FILE,
    canonical_tensors,
)
from .load import check_weights_header, load_student, read_record
from .program import PlainCausalMask, PlainOutputs, plain_mask_module, rebatch, save_program
from .save import head_counts, save_hf_where_describable, save_student
from .teacher import build_teacher

__all__ = [
    "LOADER_POTSTILL",
    "RECORD_FILE",
    "RECORD_FORMAT",
    "RECORD_VERSION",
    "WEIGHTS_FILE",
    "PlainCausalMask",
    "PlainOutputs",
    "build_teacher",
    "canonical_tensors",
    "check_weights_header",
    "head_counts",
    "load_student",
    "plain_mask_module",
    "read_record",
    "rebatch",
    "save_hf_where_describable",
    "save_program",
    "save_student",
]
