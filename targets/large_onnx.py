"""ONNX files of any size: weights as external data when the model passes protobuf's 2 GB limit.

A protobuf message cannot exceed 2 GiB (``2**31 - 1`` bytes), so a model whose initializers pass
it must keep them in a side file that the graph references by offset ("external data", ONNX IR
spec, *External Tensor Data*). torch's exporter already switches to external data above 1.5 GiB of
initializers (``_LARGE_MODEL_THRESHOLD``) and writes ``<name>.data`` beside the model; this module
makes that explicit, keeps the side file with the model, and checks and saves such models without
ever building a >2 GB proto in memory:

- ``needs_external_data(module)``: parameter + buffer bytes at or above ``EXTERNAL_DATA_THRESHOLD``
  (128 MiB: external data also keeps the export and the ONNX Runtime session from holding extra
  copies of the weights, see below).
- ``onnx_destination(path)``: a temporary folder to export into; on success every file written
  there (the model and its side files) is moved beside ``path``, the side files first and the model
  last, so a ``model.onnx`` never exists without its data.
- ``check_onnx(path)``: ``onnx.checker`` on the *path* (the C++ checker reads the proto and checks
  that each external file exists and is large enough), with full shape inference.
- ``save_onnx(model, path)``: one file, or external data when the proto would pass the limit.
- ``external_files(path)``: the side files a model references, for artefact records and bundles.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from potstill.outputs.atomic import atomic_path
from torch import nn

#: protobuf's hard limit on one serialised message
PROTOBUF_LIMIT = 2**31 - 1
#: weights from this size on go to external data. Well under the 2 GB limit (and torch.onnx's own
#: switch at 1.5 GiB) because it also bounds memory: an inline export builds the weights into an
#: in-memory protobuf and its serialisation (measured +2.3x the weights at peak for a 124M-parameter
#: decoder, against +0.3x with external data), and ONNX Runtime reads an inline file into a buffer
#: before it copies the initializers (+2.7x against +1.05x).
EXTERNAL_DATA_THRESHOLD = 128 * 1024 * 1024


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's distinct parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def needs_external_data(module: nn.Module) -> bool:
    """True when the weights are large enough to export as external data (see the threshold)."""
    return weight_bytes(module) >= EXTERNAL_DATA_THRESHOLD


@contextlib.contextmanager
def onnx_destination(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield ``TMP/<name>`` in a temporary sibling folder; on success move all it holds beside ``path``.

    Side files (external data) move before the model, so a reader that sees ``path`` sees its
    data. On an exception nothing at ``path`` changes and the temporary folder is removed.
    """
    path = Path(path)
    with atomic_path(path) as target:  # moves the model itself last, removes the folder
        yield target
        if not target.is_file():
            raise FileNotFoundError(f"{path}: the exporter wrote no model file")
        for side in sorted(target.parent.iterdir()):
            if side != target:
                os.replace(side, path.parent / side.name)


def external_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """``{"onnx_data": PATH, "onnx_data_1": ...}``: the side files ``path``'s initializers reference."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations: list[str] = []
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if location not in locations:
                locations.append(location)
    return {("onnx_data" if i == 0 else f"onnx_data_{i}"): path.parent / loc for i, loc in enumerate(locations)}


def check_onnx(path: str | os.PathLike[str]) -> None:
    """``onnx.checker`` with full shape inference, reading the model from ``path`` (any size)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def save_onnx(model: Any, path: str | os.PathLike[str]) -> Path:
    """Save an ``onnx.ModelProto`` atomically: one file, or ``<name>.data`` beside it past the limit."""
    import onnx

    path = Path(path)
    large = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD if _fits_bytesize(model) else True
    with onnx_destination(path) as tmp:
        if large:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)  # fmt: skip
        else:
            onnx.save_model(model, str(tmp))
    return path


def _fits_bytesize(model: Any) -> bool:
    """``ByteSize`` itself fails on protos past the limit with some protobuf builds."""
    try:
        model.ByteSize()
    except Exception:  # protobuf raises different types past the limit depending on the backend
        return False
    return True
