"""prune.depth: block choice by bi / mse / dp, HF configs after removal, option checks."""

from __future__ import annotations

import pytest
import torch
from potstill.ir.capture import analyze
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState
from torch import nn

from ..toys import Res

transformers = pytest.importorskip("transformers")


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Res(1.0), Res(0.0), Res(0.05), Res(2.0))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


X = torch.randn(2, 6, 8)


@pytest.mark.parametrize("method", ["bi", "mse", "dp"])
def test_drops_the_least_important_blocks(method):
    torch.manual_seed(0)
    state = CompileState(Toy().eval(), (X,), calib_data=lambda: [torch.randn(4, 6, 8)])
    PassManager(build_pipeline(f"prune.depth{{drop=2,importance={method}}}")).run(state)
    s = state.working()
    assert sorted(s.metrics["arch"]["removed_blocks"]) == ["blocks.1", "blocks.2"]
    assert len(s.module.blocks) == 2 and s.module(X).shape == (2, 6, 3)


def test_keep_and_reuse_of_block_importance():
    torch.manual_seed(0)
    state = CompileState(Toy().eval(), (X,), calib_data=lambda: [torch.randn(4, 6, 8)])
    PassManager(build_pipeline("importance.blocks{method=mse},prune.depth{keep=3,importance=mse}")).run(state)
    s = state.working()
    assert s.metrics["arch"]["removed_blocks"] == ["blocks.1"] and "block_importance" not in state.facts


def test_bad_options():
    state = CompileState(Toy().eval(), (X,))
    for spec, msg in (("prune.depth{drop=4}", "cannot remove"), ("prune.depth{drop=1,keep=1}", "not both"),
                      ("prune.depth{drop=1,importance=xx}", "must be one of")):
        with pytest.raises(Exception, match=msg):
            PassManager(build_pipeline(spec)).run(state)


def test_bert_depth_reloads(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    state = CompileState(model, (), kw, calib_data=lambda: [kw])
    PassManager(build_pipeline("prune.depth{drop=2,importance=bi}")).run(state)
    student = state.working().module
    assert student.config.num_hidden_layers == 2 and len(student.encoder.layer) == 2
    student.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(**kw).last_hidden_state, reloaded(**kw).last_hidden_state)


def test_llama_depth_reloads(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                   use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    assert [b.name for b in analyze(model, (ids,)).blocks] == [f"model.layers.{i}" for i in range(3)]
    state = CompileState(model, (ids,), calib_data=lambda: [ids])
    PassManager(build_pipeline("prune.depth{drop=1,importance=mse}")).run(state)
    student = state.working().module
    assert student.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    student.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reloaded(ids).logits)
