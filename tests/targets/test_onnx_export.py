"""ONNX export: text inputs take any batch and sequence length; every tensor output is lowered;
the TensorRT bundle's trtexec profile spans the profile's batch and sequence ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from potstill.profiles import load_profile
from potstill.targets import lower
from potstill.targets.onnx_export import export_onnx
from potstill.targets.tensorrt import shape_range
from torch import nn

transformers = pytest.importorskip("transformers")


class TwoHeads(nn.Module):
    """A tuple-output model: logits and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.cls = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = torch.relu(self.body(x))
        return self.cls(h), {"embedding": h, "norm": h.norm(dim=-1)}


def test_multi_output_lowers_every_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = TwoHeads().eval()
    x = torch.randn(2, 6)
    e = export_onnx(m, (x,), tmp_path / "m.onnx")
    assert e.output_names == ["output", "output.1.embedding", "output.1.norm"]
    assert any("engine outputs" in n for n in e.notes)
    s = ort.InferenceSession(str(tmp_path / "m.onnx"))
    x5 = torch.randn(5, 6)
    got = s.run(None, {"x": x5.numpy()})
    want = m(x5)
    np.testing.assert_allclose(got[0], want[0].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(got[1], want[1]["embedding"].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(got[2], want[1]["norm"].detach().numpy(), atol=1e-5)


def test_llama_engine_takes_any_batch_and_sequence(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    kw = {"input_ids": torch.randint(0, 50, (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)}
    e = export_onnx(m, (), tmp_path / "l.onnx", kw)
    assert e.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    s = ort.InferenceSession(str(tmp_path / "l.onnx"))
    for batch, seq in ((3, 7), (1, 50)):
        ids = torch.randint(0, 50, (batch, seq))
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, seq), np.int64)}
        got = s.run(["output"], feeds)[0]
        with torch.no_grad():
            want = m(input_ids=ids, attention_mask=torch.ones(batch, seq, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_tensorrt_bundle_sequence_profile(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=128)
    m = transformers.BertModel(cfg).eval()
    kw = {"input_ids": torch.randint(0, 50, (1, 24)), "attention_mask": torch.ones(1, 24, dtype=torch.long)}
    profile = load_profile("h100-trt-fp16")
    art = lower(m, (), profile, tmp_path, target="tensorrt", example_kwargs=kw)
    build = (tmp_path / "build.sh").read_text()
    t = profile.tensorrt
    top = min(t.max_sequence, 128)
    assert f"--minShapes=input_ids:{t.min_batch}x{t.min_sequence}" in build
    assert f"--optShapes=input_ids:{t.opt_batch}x24" in build  # the timing shape
    assert f"--maxShapes=input_ids:{t.max_batch}x{top}" in build
    assert art.parity["ok"]
    tight = profile.model_copy(update={"tensorrt": t.model_copy(update={"opt_sequence": 16, "max_sequence": 64})})
    ranges = shape_range([("input_ids", [None, None]), ("pixel_values", [None, 3, 8, 8])],
                         {"input_ids": (1, 24), "pixel_values": (1, 3, 8, 8)}, tight, max_positions=512)
    assert ranges["input_ids"] == ([t.min_batch, 1], [t.opt_batch, 16], [t.max_batch, 64])
    assert ranges["pixel_values"][2] == [t.max_batch, 3, 8, 8]


def test_export_folds_constants_and_batchnorm(tmp_path: Path) -> None:
    """``fold_and_clean``: BatchNorm (after a padded conv and a depthwise one) is folded into the
    convolutions, constant subgraphs are gone, and the engine still computes the module."""
    import onnx

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.ZeroPad2d(1), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Dropout(0.1),
    ).eval()  # fmt: skip
    for bn in (m[2], m[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    export_onnx(m, (x,), tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "BatchNormalization" not in ops and "Dropout" not in ops and "Pad" not in ops, ops
    assert ops.count("Conv") == 2
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, m(x).detach().numpy(), atol=1e-4, rtol=1e-4)
