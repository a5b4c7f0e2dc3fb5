"""Least-squares reconstruction of the consumers of pruned units."""

from __future__ import annotations

import pytest
import torch
from potstill.inputs.data import Batch
from potstill.ir.capture import analyze
from potstill.ir.surgery import prune_width
from potstill.passes.prune.reconstruct import consumers, reconstruct
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def redundant_mlp() -> MLP:
    """Neurons 4..7 are exactly twice neurons 0..3 (relu(2z) = 2 relu(z))."""
    torch.manual_seed(0)
    m = MLP().eval()
    with torch.no_grad():
        m.fc1.weight[4:] = 2 * m.fc1.weight[:4]
        m.fc1.bias[4:] = 2 * m.fc1.bias[:4]
    return m


def test_exact_when_dropped_units_are_redundant():
    model = redundant_mlp()
    x = torch.randn(64, 3)
    a = analyze(model, (x,))
    (g,) = [g for g in a.prunable() if g.n_units == 8]
    assert consumers(model, a, [g.id]) == {"fc2": g.id}
    keep = {g.id: [0, 1, 2, 3]}
    student = prune_width(model, a, keep)
    done = reconstruct(model, student, a, keep, [Batch((x,))], ridge=1e-10)
    assert done == ["fc2"]
    plain = prune_width(model, a, keep)
    x_test = torch.randn(16, 3)
    with torch.no_grad():
        ref = model(x_test)
        torch.testing.assert_close(student(x_test), ref, rtol=1e-4, atol=1e-4)
        assert (plain(x_test) - ref).abs().max() > 1e-2


class ConvChain(nn.Module):
    """conv(3x3) -> relu -> conv(3x3) -> relu -> conv(3x3): two pruned groups, refitted in order."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def test_conv_refit_is_exact_for_redundant_channels_and_sequential():
    """Channels 4..7 of c1 are twice channels 0..3: dropping them is recoverable exactly by refitting
    c2 (3x3, through im2col); c2's output is pruned too, and c3 is then fitted on the refitted c2's
    outputs (the known answer: the teacher's output on held-out inputs)."""
    torch.manual_seed(0)
    model = ConvChain().eval()
    with torch.no_grad():
        model.c1.weight[4:] = 2 * model.c1.weight[:4]
        model.c1.bias[4:] = 2 * model.c1.bias[:4]
        model.c2.weight[4:] = 2 * model.c2.weight[:4]  # c2's channels 4..7 redundant as well
        model.c2.bias[4:] = 2 * model.c2.bias[:4]
    x = torch.randn(8, 2, 6, 6)
    a = analyze(model, (x,))
    groups = sorted((g for g in a.prunable() if g.n_units == 8), key=lambda g: min(m.param for m in g.members))
    keep = {g.id: [0, 1, 2, 3] for g in groups}
    student = prune_width(model, a, keep)
    done = reconstruct(model, student, a, keep, [Batch((x,))], ridge=1e-10)
    assert done == ["c2", "c3"]
    x_test = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(student(x_test), model(x_test), rtol=1e-3, atol=1e-3)
        assert (prune_width(model, a, keep)(x_test) - model(x_test)).abs().max() > 1e-2


class PointwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.project(torch.relu(self.dw(torch.relu(self.expand(x))))))


def test_pass_reduces_error_on_linear_and_pointwise_consumers():
    torch.manual_seed(0)
    for model, shape in ((MLP().eval(), (32, 3)), (PointwiseNet().eval(), (4, 4, 8, 8))):
        x = torch.randn(*shape)
        errors = []
        for recon in ("false", "true"):
            state = CompileState(model, (x,), calib_data=lambda shape=shape: [torch.randn(*shape) for _ in range(4)])
            PassManager(build_pipeline(f"prune.width{{ratio=0.5,align=1,allocation=global,reconstruct={recon}}}")).run(state)
            with torch.no_grad():
                errors.append(float((state.working().module(x) - model(x)).pow(2).mean()))
            if recon == "true":
                assert state.working().metrics["reconstructed"]
        assert errors[1] < errors[0]


def test_refit_never_writes_into_the_source():
    """``prune_width`` shares what it did not slice (fc2's bias); the refit writes it in place."""
    model = redundant_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 3)
    a = analyze(model, (x,))
    (g,) = [g for g in a.prunable() if g.n_units == 8]
    student = prune_width(model, a, {g.id: [0, 1, 2, 3]})
    assert student.fc2.bias.data_ptr() == model.fc2.bias.data_ptr()
    reconstruct(model, student, a, {g.id: [0, 1, 2, 3]}, [Batch((x,))], ridge=1e-10)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert student.fc2.bias.data_ptr() != model.fc2.bias.data_ptr()  # the student owns what it wrote


def _refit_both_ways(model: nn.Module, kwargs: list[dict[str, torch.Tensor]], kinds: set[str]):
    a = analyze(model, (), {**kwargs[0], "use_cache": False})  # the batches keep the default cache
    keep = {g.id: list(range(0, g.n_units, 2)) for g in a.prunable() if g.kind in kinds}
    assert keep
    batches = [Batch((), k) for k in kwargs]
    out = []
    for layerwise in (True, False):
        student = prune_width(model, a, keep)
        calls = []
        first = student.get_submodule("model.embed_tokens" if hasattr(student, "model") else "embeddings")
        handle = first.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        done = reconstruct(model, student, a, keep, batches, layerwise=layerwise)
        handle.remove()
        out.append((student, done, len(calls)))
    (lw, done_lw, calls_lw), (whole, done_whole, calls_whole) = out
    assert done_lw == done_whole and len(done_lw) >= 2
    for (n, p), (_, q) in zip(lw.state_dict().items(), whole.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    # whole-model captures run the model once per refitted layer and batch (twice: both models);
    # layer by layer, each model runs up to its first block once per batch (plus one check)
    assert calls_lw <= 2 * len(batches) and calls_whole >= len(done_whole) * len(batches)


def test_layerwise_refit_equals_whole_model_refit_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()  # use_cache defaults on: the blocks must not append to it
    ids = [torch.randint(0, 64, (2, 12)) for _ in range(3)]
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # padding is masked out of the fit
    _refit_both_ways(model, [{"input_ids": i, "attention_mask": mask} for i in ids], {"neurons", "kv_heads", "heads"})


def test_layerwise_refit_equals_whole_model_refit_bert_residual():
    """BERT's output blocks: the Kwon residual target (the LayerNorm's input) is captured in-block."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=32)  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = [torch.randint(0, 64, (2, 10)) for _ in range(3)]
    _refit_both_ways(model, [{"input_ids": i, "attention_mask": torch.ones(2, 10, dtype=torch.long)} for i in ids],
                     {"neurons", "kv_heads", "heads"})


def _tiny_bert_with_redundant_neurons():
    """A tiny BERT whose FFN neurons 32..63 copy neurons 0..31 and whose down projection reads the
    copies at half weight: dropping them is undone exactly by scaling the kept neurons by 1.5."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight[32:] = layer.intermediate.dense.weight[:32]
            layer.intermediate.dense.bias[32:] = layer.intermediate.dense.bias[:32]
            layer.output.dense.weight[:, 32:] = 0.5 * layer.output.dense.weight[:, :32]
    return model


def _text_batches(n: int, seed: int, vocab: int = 50) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch((), {"input_ids": torch.randint(0, vocab, (4, 16), generator=g),
                       "attention_mask": torch.ones(4, 16, dtype=torch.long)}) for _ in range(n)]


def test_kwon_mask_tuning_finds_the_known_scale_on_tiny_bert():
    """Scale-mode least squares (Kwon's mask tuning) recovers the exact answer: the held-out output
    error of the pruned BERT falls from visible to ~0."""
    from potstill.passes.prune.width_options import heldout_error

    model = _tiny_bert_with_redundant_neurons()
    cal, held = _text_batches(6, 0), _text_batches(3, 1)
    a = analyze(model, (), example_kwargs=dict(cal[0].kwargs))
    keep = {g.id: list(range(32)) for g in a.prunable() if g.kind == "neurons"}
    assert len(keep) == 2
    plain = prune_width(model, a, keep)
    tuned = prune_width(model, a, keep)
    done = reconstruct(model, tuned, a, keep, cal, ridge=1e-9, mode="scale")
    assert done == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    before, after = heldout_error(model, plain, held), heldout_error(model, tuned, held)
    assert before > 1e-6 and after < 1e-3 * before
    w = tuned.encoder.layer[0].output.dense.weight
    torch.testing.assert_close(w, 1.5 * model.encoder.layer[0].output.dense.weight[:, :32], rtol=1e-4, atol=1e-6)


def test_refit_is_kept_only_when_it_lowers_heldout_error():
    """Calibrated on two tokens far from the held-out text, the refit is judged on the held-out
    split: the student is whichever of plain / refit has the lower held-out error, as recorded."""
    from potstill.passes.prune.width_options import heldout_error

    model = _tiny_bert_with_redundant_neurons()
    with torch.no_grad():  # make the copies imperfect, so there is something to (over)fit
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight[32:] += 0.3 * torch.randn(32, 32)
    ids = torch.tensor([[1, 2, 1, 2]]).repeat(4, 1)  # two distinct tokens: far from the held-out text
    same = Batch((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    held = _text_batches(3, 1)
    state = CompileState(model, (), dict(same.kwargs), calib_data=lambda: iter([same] * 4),
                         heldout_data=lambda: iter(held))
    PassManager(build_pipeline("prune.width{per_kind=[neurons=0.5],refit=full,ridge=1e-9}")).run(state)
    student = state.working()
    (cand,) = student.metrics["prune"]["candidates"]
    kept = "plain" if cand["refit"] > cand["plain"] else "refit"
    assert cand["chosen"] == kept
    assert (student.metrics["prune"]["reconstructed"] == []) == (kept == "plain")
    assert heldout_error(model, student.module, held) == pytest.approx(cand[kept])
