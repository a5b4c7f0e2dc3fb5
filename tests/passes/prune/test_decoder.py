"""The decoder default: FLAP bias compensation, angular depth selection, the next-block refit, and the
choice among width / depth / mix by held-out perplexity (tiny random Llamas built from configs)."""

from __future__ import annotations

import pytest
import torch
import transformers
from potstill.inputs.data import as_batch
from potstill.ir.capture import analyze
from potstill.ir.surgery import prune_width
from potstill.passes.importance.blocks import angular_distances, angular_run
from potstill.passes.prune.decoder import perplexity
from potstill.passes.prune.flap import compensate_bias, flap_scores
from potstill.passes.prune.heal import refit_block
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState


def tiny_llama(layers: int = 4, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   use_cache=False, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (3, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # left padding, as SmolLM2's tokenizer pads
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _decoder_state() -> tuple[transformers.LlamaForCausalLM, list[dict[str, torch.Tensor]], CompileState]:
    """A tiny Llama teacher with six calibration batches and two held out."""
    model = tiny_llama(layers=4)
    data = batches(8)
    state = CompileState(model, (), {"input_ids": data[0]["input_ids"]}, calib_data=lambda: data[:6],
                         hf={"path": "", "task": "text-generation", "auto_class": "AutoModelForCausalLM"})
    state.heldout_data = lambda: data[6:]
    return model, data, state


def _neuron_group(model, analysis, layer: int):
    name = f"model.layers.{layer}.mlp.down_proj"
    return next(g for g in analysis.prunable()
                if g.kind == "neurons" and any(m.module == name and m.role == "in" for m in g.members))


def _mean_output(model, name: str, data) -> torch.Tensor:
    outs = []

    def hook(_m, _a, out):
        outs.append(out[mask.bool()])

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for kw in data:
                mask = kw["attention_mask"]
                model(**kw)
    finally:
        h.remove()
    return torch.cat(outs).double().mean(0)


def test_flap_bias_compensation_keeps_the_layer_mean_output():
    model = tiny_llama()
    data = batches()
    analysis = analyze(model, (), {"input_ids": data[0]["input_ids"]})
    g = _neuron_group(model, analysis, 1)
    scores = flap_scores(model, [g], [as_batch(b) for b in data])
    assert scores.z[g.id].shape == (g.n_units,) and abs(float(scores.z[g.id].mean())) < 1e-9
    keep = {g.id: sorted(torch.topk(torch.as_tensor(scores.z[g.id]), g.n_units // 2).indices.tolist())}
    plain = prune_width(model, analysis, keep)
    compensated = prune_width(model, analysis, keep)
    done = compensate_bias(compensated, [g], keep, model, scores.stats)
    name = "model.layers.1.mlp.down_proj"
    assert done == [name] and compensated.get_submodule(name).bias is not None
    assert model.get_submodule(name).bias is None  # the teacher is not touched
    want = _mean_output(model, name, data)
    err_plain = float((_mean_output(plain, name, data) - want).abs().max())
    err_comp = float((_mean_output(compensated, name, data) - want).abs().max())
    assert err_comp < 1e-5 < err_plain


def test_angular_depth_picks_the_near_identity_block():
    model = tiny_llama(layers=5)
    with torch.no_grad():  # block 3 adds almost nothing to the stream
        model.model.layers[3].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[3].mlp.down_proj.weight.mul_(1e-4)
    names = [f"model.layers.{i}" for i in range(5)]
    data = [as_batch(b) for b in batches()]
    dist = angular_distances(model, names, data, 1)
    assert min(dist, key=dist.__getitem__) == 3 and dist[3] < 0.01 < min(d for i, d in dist.items() if i != 3)
    assert angular_run(model, names, data, 1) == ["model.layers.3"]
    assert "model.layers.3" in angular_run(model, names, data, 2)
    state = CompileState(model, (), {"input_ids": data[0].kwargs["input_ids"]}, calib_data=batches)
    PassManager(build_pipeline("prune.depth{drop=1,importance=angular}")).run(state)
    assert state.working().metrics["arch"]["removed_blocks"] == ["model.layers.3"]


def test_next_block_refit_lowers_the_next_block_error():
    from potstill.ir.surgery import remove_blocks

    model = tiny_llama(layers=4)
    data = [as_batch(b) for b in batches(8)]
    analysis = analyze(model, (), {"input_ids": data[0].kwargs["input_ids"]})
    pruned = remove_blocks(model, analysis, ["model.layers.1"])

    def block_error(student) -> float:
        want = _mean_output(model, "model.layers.2.mlp.down_proj", batches(4, seed=9))
        got = _mean_output(student, "model.layers.1.mlp.down_proj", batches(4, seed=9))
        return float((got - want).norm())

    before = block_error(pruned)
    before_weight = pruned.model.layers[1].self_attn.q_proj.weight.detach().clone()
    done = refit_block(model, model.model.layers[2], pruned, pruned.model.layers[1], data)
    assert "self_attn.q_proj" in done and "mlp.down_proj" in done
    assert torch.equal(model.model.layers[2].self_attn.q_proj.weight, before_weight)  # teacher untouched
    assert block_error(pruned) < before


@pytest.mark.parametrize("ratio_of", ["total", "prunable"])
def test_decoder_default_chooses_by_heldout_perplexity_and_reloads(tmp_path, ratio_of):
    from potstill.outputs.students_io import load_student, save_student

    model, data, state = _decoder_state()
    PassManager(build_pipeline(f"prune.width{{ratio=0.3,ratio_of={ratio_of}}}")).run(state)
    student = state.working()
    record = student.metrics["prune"]
    rows = record["decoder"]["candidates"]
    assert {r["structure"] for r in rows} >= {"width", "width+refit", "depth", "depth+heal"}
    refit = next(r for r in rows if r["structure"] == "width+refit")
    assert refit["healed"] and all(n.endswith(("o_proj", "down_proj")) for n in refit["healed"])
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["heldout_ppl_ratio"] == min(r["heldout_ppl_ratio"] for r in rows)
    heldout = [as_batch(b) for b in data[6:]]
    ratio = perplexity(student.module, heldout) / perplexity(model, heldout)
    assert ratio == pytest.approx(chosen[0]["heldout_ppl_ratio"], rel=1e-6)
    assert record["budget"]["ratio_of"] == ratio_of
    assert student.metrics["arch"]["macs"] < analyze(model, (), {"input_ids": data[0]["input_ids"]}).cost.macs
    save_student(student.module, tmp_path, teacher={"spec": "hf:x", "config": model.config.to_dict()})
    again = load_student(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**data[7]).logits, student.module(**data[7]).logits)


def test_ratio_of_is_checked():
    from potstill.errors import InputError

    with pytest.raises(InputError, match="ratio_of"):
        build_pipeline("prune.width{ratio=0.3,ratio_of=rest}")
    with pytest.raises(InputError, match="ratio_of applies to ratio"):
        build_pipeline("prune.width{macs_budget=0.5,ratio_of=prunable}")


def test_ratio_of_flag_reaches_the_width_pass_and_is_strict():
    from potstill.errors import InputError
    from potstill.plan import CompileOptions, plan_students

    plans = plan_students(CompileOptions(ratios=(0.3,), ratio_of="prunable", distill=False), "onnxruntime")
    assert plans[0].passes[0].spec() == "prune.width{ratio=0.3,ratio_of=prunable}" and plans[0].name == "macs30p"
    with pytest.raises(InputError, match="give --ratio too"):
        plan_students(CompileOptions(ratio_of="prunable"), "onnxruntime")
    with pytest.raises(InputError, match="--ratio-of"):
        plan_students(CompileOptions(pipeline="prune.width{ratio=0.3}", ratio_of="prunable"), "onnxruntime")


def test_reconstruct_false_drops_the_refit_candidate():
    *_, state = _decoder_state()
    PassManager(build_pipeline("prune.width{ratio=0.3,reconstruct=false}")).run(state)
    rows = state.working().metrics["prune"]["decoder"]["candidates"]
    assert "width" in {r["structure"] for r in rows} and "width+refit" not in {r["structure"] for r in rows}


def test_the_ffn_candidate_keeps_every_head_and_meets_the_budget():
    """``ffn+refit`` prunes FFN neurons alone (every KV group stays) and refits only the down
    projections, within the same MACs budget as the other candidates."""
    *_, state = _decoder_state()
    PassManager(build_pipeline("prune.width{ratio=0.3}")).run(state)
    record = state.working().metrics["prune"]
    ffn = next(r for r in record["decoder"]["candidates"] if r["structure"] == "ffn+refit")
    assert ffn["healed"] and all(n.endswith("mlp.down_proj") for n in ffn["healed"])
    assert ffn["macs"] <= record["budget"]["limit"]
    width = next(r for r in record["decoder"]["candidates"] if r["structure"] == "width+refit")
    assert any(n.endswith("o_proj") for n in width["healed"])  # the mixed ranking did cut heads here
