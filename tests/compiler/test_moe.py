"""Mixture-of-experts decoders: the dense expert dispatch ``torch.export`` captures
(``potstill.inputs.moe``), width pruning inside the experts, and ``prune.experts``
(``potstill.passes.prune.experts``) through the real compile, reload and engine."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from potstill.errors import InputError, PassError
from potstill.inputs.moe import (
    MOE_ATTR,
    dense_moe,
    export_friendly_moe,
    find_moe_blocks,
    moe_blocks,
    routing_weights,
)
from torch import nn

pytest.importorskip("transformers")

COMMON: dict[str, Any] = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "max_position_embeddings": 128, "use_cache": False,
                          "pad_token_id": 0}  # fmt: skip


def _families() -> dict[str, Callable[[], nn.Module]]:
    """Every sparse-MoE family of transformers 4.57 whose block is a router Linear, an ``experts``
    ModuleList and top-k (DeepSeek/GLM-style grouped sigmoid routers, fused-expert tensors
    (DBRX, GPT-OSS, Llama 4, Granite-MoE) and capacity routers (Switch, NLLB-MoE) are not)."""
    import transformers as t

    return {
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=4,
                                                                num_experts_per_tok=2)),
        "minimax": lambda: t.MiniMaxForCausalLM(t.MiniMaxConfig(**COMMON, intermediate_size=64, num_local_experts=4,
                                                                num_experts_per_tok=2, head_dim=8)),
        "qwen2_moe": lambda: t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
            num_experts_per_tok=2)),
        "qwen3_moe": lambda: t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, head_dim=8)),
        "qwen3_next": lambda: t.Qwen3NextForCausalLM(t.Qwen3NextConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2)),
        "olmoe": lambda: t.OlmoeForCausalLM(t.OlmoeConfig(**COMMON, intermediate_size=64, num_experts=4,
                                                          num_experts_per_tok=2)),
        "flex_olmo": lambda: t.FlexOlmoForCausalLM(t.FlexOlmoConfig(**COMMON, intermediate_size=64, num_experts=4,
                                                                    num_experts_per_tok=1)),
        "phimoe": lambda: t.PhimoeForCausalLM(t.PhimoeConfig(**COMMON, intermediate_size=64, num_local_experts=4,
                                                             num_experts_per_tok=2)),
        "jamba": lambda: t.JambaForCausalLM(t.JambaConfig(
            **COMMON, intermediate_size=64, num_experts=4, num_experts_per_tok=2, use_mamba_kernels=False,
            attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0)),
        "ernie4_5_moe": lambda: t.Ernie4_5_MoeForCausalLM(t.Ernie4_5_MoeConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
            moe_num_shared_experts=1, moe_layer_start_index=0, head_dim=8)),
        "hunyuan_v1_moe": lambda: t.HunYuanMoEV1ForCausalLM(t.HunYuanMoEV1Config(
            **COMMON, intermediate_size=64, num_experts=4, moe_topk=2, head_dim=8)),
    }  # fmt: skip


def _build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _families()[family]().eval()
    with torch.no_grad():  # routers far from uniform, so that a wrong routing rule cannot pass as the right one
        for _, block, spec in find_moe_blocks(model):
            block.get_submodule(spec.router_linear).weight.normal_(0.0, 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# Dense dispatch


@pytest.mark.parametrize("family", sorted(_families()))
def test_dense_dispatch_computes_what_the_sparse_block_computes(family: str) -> None:
    model = _build(family)
    blocks = {name: block for name, block, _ in find_moe_blocks(model)}
    assert blocks, f"{family}: no sparse MoE block found"
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, COMMON["hidden_size"], generator=gen)
    ids = torch.randint(1, 128, (2, 9), generator=gen)
    with torch.no_grad():
        before = {name: block(hidden.clone()) for name, block in blocks.items()}
        logits = model(input_ids=ids).logits
    done = export_friendly_moe(model)
    assert set(done) == set(blocks), f"{family}: routed {sorted(done)} of {sorted(blocks)}"
    assert export_friendly_moe(model) == {}  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
    name, block = next(iter(blocks.items()))
    ref = before[name]
    with torch.no_grad():
        out = block(hidden.clone())
    assert type(out) is type(ref)
    if isinstance(ref, tuple):  # (hidden, router_logits), as the family returns them
        assert len(out) == len(ref)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    program = torch.export.export(block, (hidden.clone(),), strict=False)  # the sparse loop raised here
    exported = program.module()(hidden.clone())
    torch.testing.assert_close(exported[0] if isinstance(exported, tuple) else exported,
                               ref[0] if isinstance(ref, tuple) else ref, atol=1e-5, rtol=1e-5)


def test_the_sparse_block_does_not_export_without_the_dispatch() -> None:
    model = _build("mixtral")
    block = next(iter(find_moe_blocks(model)))[1]
    with pytest.raises(Exception, match=r"(?i)data.dependent|guard"):
        torch.export.export(block, (torch.randn(1, 16, COMMON["hidden_size"]),), strict=False)


class ToyMoe(nn.Module):
    """A sparse MoE block of no known family: found by structure; softmax or sigmoid routing."""

    def __init__(self, hidden: int = 8, experts: int = 4, top_k: int = 2, sigmoid: bool = False) -> None:
        super().__init__()
        self.top_k, self.sigmoid = top_k, sigmoid
        self.router = nn.Linear(hidden, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 16), nn.GELU(), nn.Linear(16, hidden))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        probs = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        weight, index = torch.topk(probs, self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e in range(len(self.experts)):
            rows, slot = torch.where(index == e)
            out.index_add_(0, rows, self.experts[e](flat[rows]) * weight[rows, slot, None])
        return out.reshape(x.shape)


class ToyMoeModel(nn.Module):
    def __init__(self, vocab: int = 32, hidden: int = 8, experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.moe = ToyMoe(hidden, experts, top_k)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.head(h + self.moe(h))


def test_a_routing_no_rule_reproduces_keeps_its_forward() -> None:
    torch.manual_seed(0)
    softmax, sigmoid = ToyMoe(), ToyMoe(sigmoid=True)
    assert set(export_friendly_moe(nn.ModuleDict({"a": softmax, "b": sigmoid}))) == {"a"}
    assert getattr(sigmoid, MOE_ATTR, None) is None and "forward" not in vars(sigmoid)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(softmax(x), type(softmax).forward(softmax, x), atol=1e-6, rtol=1e-5)


def test_training_mode_runs_the_family_forward() -> None:
    torch.manual_seed(0)
    block = ToyMoe()
    export_friendly_moe(block)
    calls: list[str] = []
    original = ToyMoe.forward

    def spy(self: ToyMoe, x: torch.Tensor) -> torch.Tensor:
        calls.append("sparse")
        return original(self, x)

    ToyMoe.forward = spy  # type: ignore[method-assign]
    try:
        block.train()
        block(torch.randn(1, 3, 8))
        block.eval()
        block(torch.randn(1, 3, 8))
    finally:
        ToyMoe.forward = original  # type: ignore[method-assign]
    assert calls == ["sparse"]


# ---------------------------------------------------------------------------------------------
# prune.experts: the statistics and the surgery


def _state(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Any:
    from potstill.state import CompileState

    return CompileState.from_teacher(model, (), example_kwargs=dict(batches[0]), calib_data=lambda: iter(batches))


def _run(state: Any, spec: str) -> Any:
    from potstill.pipeline import PassManager, build_pipeline

    PassManager(build_pipeline(spec)).run(state)
    return state.working()


def test_the_least_routed_expert_is_dropped() -> None:
    torch.manual_seed(0)
    model = ToyMoeModel(experts=4, top_k=2).eval()
    with torch.no_grad():  # a router whose statistics are known: expert 1 never wins a top-2 slot
        model.moe.router.weight.mul_(0.01)
        model.moe.router.bias.copy_(torch.tensor([2.0, -30.0, 1.0, 1.0]))
    batches = [{"input_ids": torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(i))} for i in range(3)]
    student = _run(_state(model, batches), "prune.experts{drop=1}")
    info = student.metrics["experts"]
    assert info["scores"]["moe"][1] == 0.0 and min(info["scores"]["moe"][i] for i in (0, 2, 3)) > 0
    assert info["kept"] == {"moe": [0, 2, 3]}
    new = student.module.moe
    assert len(new.experts) == 3 and new.router.weight.shape == (3, 8) and new.router.bias.shape == (3,)
    assert student.metrics["arch"]["experts"] == {"moe": 3}
    # the expert never routed to contributed nothing: the student computes what the teacher computes
    with torch.no_grad():
        ids = batches[0]["input_ids"]
        torch.testing.assert_close(student.module(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_weight_importance_is_the_summed_routing_weight() -> None:
    from potstill.inputs.moe import router_logits
    from potstill.passes.prune.experts import expert_statistics

    model = _build("olmoe")
    export_friendly_moe(model)
    gen = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(1, 128, (2, 10), generator=gen),
                "attention_mask": torch.tensor([[1] * 10, [1] * 6 + [0] * 4])}]  # fmt: skip
    seen: dict[str, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0])) for n, b in moe_blocks(model).items()]
    stats = expert_statistics(model, batches)
    for h in hooks:
        h.remove()
    valid = batches[0]["attention_mask"].reshape(-1).bool()
    for name, block in moe_blocks(model).items():  # the expected sums, from the probabilities directly
        probs = torch.softmax(router_logits(block, getattr(block, MOE_ATTR), seen[name]).double(), dim=-1)[valid]
        top = torch.topk(probs, 2, dim=-1)
        weight = torch.zeros_like(probs).scatter(-1, top.indices, top.values)  # OLMoE: top-k not renormalised
        torch.testing.assert_close(stats[name]["weight"], weight.sum(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats[name]["frequency"], (weight > 0).double().sum(0))
        assert int(stats[name]["tokens"]) == 16


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_the_router_renormalises_over_the_experts_left(family: str) -> None:
    from potstill.passes.prune.experts import drop_experts

    model = _build(family)
    export_friendly_moe(model)
    name, block = next(iter(moe_blocks(model).items()))
    spec = getattr(block, MOE_ATTR)
    x = torch.randn(40, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    new = drop_experts(model, {name: [0, 2, 3]})
    pruned = new.get_submodule(name)
    assert len(pruned.experts) == 3 and pruned.get_submodule(spec.router_linear).out_features == 3
    with torch.no_grad():
        logits = block.get_submodule(spec.router_linear)(x)
        before = routing_weights(block, spec, logits)
        after = routing_weights(pruned, spec, logits[:, [0, 2, 3]])
        probs = torch.softmax(logits[:, [0, 2, 3]], dim=-1)  # softmax over the experts left
        expect = torch.zeros_like(probs).scatter(-1, probs.topk(2).indices, probs.topk(2).values)
        if spec.normalize:
            expect = expect / expect.sum(-1, keepdim=True)
        torch.testing.assert_close(after, expect, atol=1e-6, rtol=1e-5)
        untouched = before[:, 1] == 0  # tokens that never went to expert 1
        assert 0 < int(untouched.sum()) < 40
        if spec.normalize:  # Mixtral: their top-k weights, renormalised, are what they were
            torch.testing.assert_close(after[untouched], before[untouched][:, [0, 2, 3]], atol=1e-6, rtol=1e-5)
        out_before = dense_moe(block, spec, x[None])[0][0]
        out_after = dense_moe(pruned, spec, x[None])[0][0]
    if spec.normalize:
        torch.testing.assert_close(out_after[untouched], out_before[untouched], atol=1e-5, rtol=1e-5)
    assert new.config.num_experts_per_tok == 2
    assert getattr(new.config, "num_local_experts", getattr(new.config, "num_experts", None)) == 3


@pytest.mark.parametrize(("spec", "fragment"), [
    ("prune.experts{keep=1.5}", "(0, 1]"),
    ("prune.experts{keep=0}", "(0, 1]"),
    ("prune.experts{importance=gini}", "'frequency' or 'weight'"),
    ("prune.experts{keep=0.5,drop=1}", "not both"),
    ("prune.experts{drop=-1}", "0 or more"),
    ("prune.experts{batches=0}", "at least 1"),
])  # fmt: skip
def test_bad_options_are_errors_naming_the_valid_values(spec: str, fragment: str) -> None:
    from potstill.pipeline import build_pipeline

    with pytest.raises(InputError) as e:
        build_pipeline(spec)
    assert fragment in str(e.value)


def test_a_model_without_experts_and_dropping_every_expert_are_errors() -> None:
    dense = nn.Sequential(nn.Embedding(32, 8), nn.Linear(8, 32))
    ids = {"input": torch.randint(0, 32, (2, 5))}
    with pytest.raises(PassError, match="no mixture-of-experts block") as e:
        _run(_state(dense, [ids]), "prune.experts{keep=0.5}")
    assert isinstance(e.value.__cause__, InputError)
    torch.manual_seed(0)
    with pytest.raises(PassError, match="keep at least one") as e:
        _run(_state(ToyMoeModel(), [{"input_ids": torch.randint(0, 32, (2, 5))}]), "prune.experts{drop=4}")
    assert isinstance(e.value.__cause__, InputError)


# ---------------------------------------------------------------------------------------------
# Through the command line: compile, reload, engine


def _save(family: str, root: Path) -> Path:
    path = root / family
    _build(family).save_pretrained(path)
    return path


def _compile(root: Path, teacher: Path, *flags: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    from potstill.cli import main

    out = root / "out"
    assert main(["compile", f"hf:{teacher}", "--no-teacher-timing", "-o", str(out), *flags]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    student = manifest["students"][0]
    return out / student["dir"], manifest, student


def _reload_and_engine(student_dir: Path) -> tuple[nn.Module, float]:
    """The reloaded student and the largest gap between it and the ONNX engine on inputs of another
    batch and length than the example (outputs of scale > 1e-3, so that parity is not vacuous)."""
    import numpy as np
    import onnxruntime as ort
    from potstill import load_student

    model = load_student(student_dir)
    gen = torch.Generator().manual_seed(5)
    feeds = {"input_ids": torch.randint(3, 100, (3, 11), generator=gen), "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    with torch.no_grad():
        expect = model(**feeds).logits.numpy()
    session = ort.InferenceSession(str(student_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run([session.get_outputs()[0].name], {k: v.numpy() for k, v in feeds.items() if k in names})[0]
    assert got.shape == expect.shape and float(np.abs(expect).max()) > 1e-3
    return model, float(np.abs(got - expect).max() / max(1.0, float(np.abs(expect).max())))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_compile_prunes_inside_the_experts(family: str, tmp_path: Path) -> None:
    teacher = _save(family, tmp_path)
    student_dir, manifest, student = _compile(tmp_path, teacher, "--ratio", "0.5", "--no-distill")
    assert student["macs"] <= 0.8 * manifest["teacher"]["macs"], (student["macs"], manifest["teacher"]["macs"])
    assert student["parity"]["ok"]
    record = json.loads((student_dir / "architecture.json").read_text())
    widths = {k: v["shape"][0] for k, v in record["tensors"].items()
              if ".experts." in k and k.endswith(("up_proj.weight", "w3.weight"))}
    full = 64 if family == "mixtral" else 32
    assert widths and any(w < full for w in widths.values()), widths  # the experts' FFN widths are groups
    model, err = _reload_and_engine(student_dir)
    assert err <= 1e-4, err
    assert moe_blocks(model), "the reloaded student has the capturable dispatch"


def test_compile_with_expert_pruning_halves_the_experts(tmp_path: Path) -> None:
    teacher = _save("mixtral", tmp_path)
    student_dir, manifest, student = _compile(tmp_path, teacher, "--pipeline", "prune.experts{keep=0.5}")
    record = json.loads((student_dir / "architecture.json").read_text())
    assert record["experts"] == {f"model.layers.{i}.block_sparse_moe": 2 for i in range(2)}
    assert record["student_config"]["num_local_experts"] == 2
    assert all(len(kept) == 2 for name, kept in record["removed_blocks"].items() if name.endswith(".experts"))
    assert student["metrics"]["arch"]["experts"] == record["experts"]
    assert student["macs"] < 0.75 * manifest["teacher"]["macs"]
    assert student["parity"]["ok"]
    model, err = _reload_and_engine(student_dir)
    assert err <= 1e-4, err
    for block in moe_blocks(model).values():
        assert len(block.experts) == 2 and block.gate.weight.shape[0] == 2
    if "transformers.AutoModelForCausalLM" in record["loaders"]:  # the config states the new count
        import transformers

        again = transformers.AutoModelForCausalLM.from_pretrained(student_dir / "hf").eval()
        ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    bad = dict(record, experts=dict.fromkeys(record["experts"], 3))
    (student_dir / "architecture.json").write_text(json.dumps(bad))
    from potstill import load_student

    with pytest.raises(InputError, match="should hold 3 experts"):
        load_student(student_dir)
