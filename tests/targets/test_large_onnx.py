"""ONNX past protobuf's 2 GB limit: external data written beside the model, checked, reloaded, matched.

The fast tests lower the threshold so a tiny model takes the external-data path through every
lowering (ONNX Runtime and the TensorRT bundle); the slow test exports a real >2 GB model built
cheaply from one large embedding table.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from potstill.targets import large_onnx, lower
from potstill.targets.onnx_export import export_onnx
from potstill.targets.tensorrt import tensorrt_status
from torch import nn


@pytest.fixture
def tiny_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(large_onnx, "EXTERNAL_DATA_THRESHOLD", 1024)


def _initializers_external(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    big = [t for t in model.graph.initializer if np.prod(t.dims) * 4 >= 4096]
    return bool(big) and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)


def test_small_model_stays_one_file(tmp_path: Path, cnn: nn.Module) -> None:
    export_onnx(cnn, (torch.randn(2, 3, 16, 16),), tmp_path / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert large_onnx.external_files(tmp_path / "model.onnx") == {}


def test_external_data_lowering_matches(tmp_path: Path, cnn: nn.Module, tiny_threshold: None) -> None:
    art = lower(cnn, (torch.randn(2, 3, 16, 16),), "cpu", tmp_path, target="onnxruntime")
    onnx_path, data = Path(art.files["onnx"]), Path(art.files["onnx_data"])
    assert data == tmp_path / "model.onnx.data" and data.stat().st_size > 4096
    assert _initializers_external(onnx_path)
    assert art.parity["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temp left
    # the model reads its weights from the side file: without it, it no longer loads
    data.rename(tmp_path / "elsewhere.data")
    with pytest.raises(Exception, match=r"model\.onnx\.data|external"):
        ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def test_tensorrt_bundle_carries_external_data(tmp_path: Path, cnn: nn.Module, tiny_threshold: None) -> None:
    if tensorrt_status()[0]:
        pytest.skip("TensorRT is usable here: an engine is built instead of a bundle")
    art = lower(cnn, (torch.randn(2, 3, 16, 16),), "jetson-orin-nano-trt-fp16", tmp_path, target="tensorrt")
    assert (tmp_path / "model.onnx.data").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"]["onnx_data"] == "model.onnx.data"
    assert "--onnx=model.onnx" in (tmp_path / "build.sh").read_text()  # trtexec finds the .data beside it
    assert art.parity["ok"]


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), large_onnx.onnx_destination(tmp_path / "model.onnx") as tmp:
        (tmp.parent / "model.onnx.data").write_bytes(b"x")
        raise RuntimeError("exporter failed")
    assert list(tmp_path.iterdir()) == []


class BigTable(nn.Module):
    """One embedding table just past 2 GiB of fp32 (2.2 GB) and a small head."""

    def __init__(self, rows: int = 537_000, dim: int = 1024) -> None:
        super().__init__()
        # linspace fills 550M floats in about a second; normal_ init would take far longer
        self.embed = nn.Embedding(rows, dim, _weight=torch.linspace(-1.0, 1.0, rows * dim).view(rows, dim))
        self.head = nn.Linear(dim, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


@pytest.mark.slow
def test_model_over_2gb_exports_reloads_and_matches(tmp_path: Path) -> None:
    model = BigTable().eval()
    assert large_onnx.weight_bytes(model) > large_onnx.PROTOBUF_LIMIT
    rows = model.embed.num_embeddings
    # rows at the end of the table lie past byte 2**31 of the data file
    ids = torch.tensor([[0, 1, rows // 2, rows - 3], [rows - 1, 5, rows - 2, 7]])
    with torch.inference_mode():
        expected = model(ids).numpy()
    path = tmp_path / "model.onnx"
    exported = export_onnx(model, (ids,), path)
    del model
    gc.collect()  # the reload below must not sit beside the torch copy
    files = large_onnx.external_files(path)
    assert files == {"onnx_data": tmp_path / "model.onnx.data"}
    assert files["onnx_data"].stat().st_size > large_onnx.PROTOBUF_LIMIT
    assert path.stat().st_size < 1 << 20  # the graph alone
    large_onnx.check_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {exported.spec.names[0]: ids.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
