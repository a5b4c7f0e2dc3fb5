"""Head / GQA / hidden-size pruning of Hugging Face models built small from configs: the students
save, reload with from_pretrained and compute the same outputs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from potstill.inputs.data import primary_output  # noqa: E402
from potstill.pipeline import PassManager, build_pipeline  # noqa: E402
from potstill.state import CompileState  # noqa: E402

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def calib():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 100, (4, 8), generator=g), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
            for _ in range(2)]


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval(), {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, intermediate_size=128, max_position_embeddings=32,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval(), {"input_ids": IDS}


def compile_and_reload(model, kwargs, spec, tmp_path, auto):
    state = CompileState(model, (), dict(kwargs), calib_data=calib)
    PassManager(build_pipeline(spec)).run(state)
    student = state.working().module
    student.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = primary_output(student(**kwargs)), primary_output(reloaded(**kwargs))
    torch.testing.assert_close(a, b)
    return state, student, reloaded


def test_bert_heads_and_ffn_reload(tmp_path):
    model, kw = bert()
    state, student, reloaded = compile_and_reload(
        model, kw, "importance.activation,prune.width{per_kind=[heads=0.5,neurons=0.5]}", tmp_path,
        transformers.AutoModel
    )
    for layer in (*student.encoder.layer, *reloaded.encoder.layer):
        assert layer.attention.self.query.out_features == 32  # 2 of 4 heads of 16
        assert layer.attention.self.num_attention_heads == 2
        assert layer.intermediate.dense.out_features == 64
    assert reloaded.config.intermediate_size == 64
    assert all(len(v) == 2 for v in reloaded.config.pruned_heads.values())
    widths = state.working().metrics["arch"]["widths"]
    assert {w["kind"] for w in widths.values()} == {"heads", "neurons"}
    assert student(**kw).last_hidden_state.shape == (2, 8, 64)


def test_llama_gqa_and_hidden_reload(tmp_path):
    model, kw = llama()
    spec = "importance.taylor,prune.width{per_kind=[kv_heads=0.5,neurons=0.5,hidden=0.25]}"
    _, student, reloaded = compile_and_reload(model, kw, spec, tmp_path, transformers.AutoModelForCausalLM)
    cfg = reloaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.hidden_size) == (4, 2, 64, 48)
    attn = reloaded.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * 8 and attn.k_proj.out_features == 2 * 8
    assert student(**kw).logits.shape == (2, 8, 100)


def test_hf_students_uniform_on_request(tmp_path):
    model, kw = bert()
    state = CompileState(model, (), dict(kw), calib_data=calib)
    # global allocation gives layers different widths unless asked for one width per kind (a config
    # can then describe the student, and hf/ reloads with from_pretrained)
    PassManager(build_pipeline("importance.activation,prune.width{ratio=0.4,uniform=true}")).run(state)
    widths = state.working().metrics["arch"]["widths"]
    by_kind: dict[str, set[int]] = {}
    for w in widths.values():
        by_kind.setdefault(w["kind"], set()).add(w["units"])
    assert all(len(v) == 1 for v in by_kind.values())
