"""Block-by-block calibration gives what one full forward gives: the same hidden states after each
block and the same per-layer statistics gathered by hooks, with one block's inputs held at a time."""

from __future__ import annotations

import pytest
import torch
from potstill.inputs.data import Batch
from potstill.ir.layerwise import first_block_inputs, run_layerwise
from torch import nn

transformers = pytest.importorskip("transformers")


@pytest.fixture
def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches() -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [Batch((), {"input_ids": torch.randint(0, 100, (2, 7), generator=g)}) for _ in range(3)]


def test_hidden_states_match_the_full_forward(llama: nn.Module) -> None:
    layers = llama.model.layers
    seen: list[int] = []
    # stop after two blocks: outputs of block 1 are hidden_states[2] of the full forward
    out = run_layerwise(llama, layers[:2], _batches(), visit=lambda i, block, xs: seen.append(len(xs)))
    assert seen == [3, 3]
    with torch.no_grad():
        full = [llama(**b.kwargs, output_hidden_states=True).hidden_states[2] for b in _batches()]
    for a, b in zip(out, full):
        torch.testing.assert_close(a, b)


def test_hooks_in_visit_collect_the_full_forward_statistics(llama: nn.Module) -> None:
    def stats_full() -> list[torch.Tensor]:
        acc = [torch.zeros(64) for _ in range(3)]
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, a, i=i: acc[i].add_(a[0].abs().sum((0, 1)))) for i, layer in enumerate(llama.model.layers)]
        with torch.no_grad():
            for b in _batches():
                b.run(llama)
        for h in hooks:
            h.remove()
        return acc

    acc = [torch.zeros(64) for _ in range(3)]
    handles = []

    def visit(i: int, block: nn.Module, xs: list) -> None:
        for h in handles:
            h.remove()
        handles.append(block.mlp.down_proj.register_forward_pre_hook(lambda _m, a: acc[i].add_(a[0].abs().sum((0, 1)))))

    run_layerwise(llama, llama.model.layers, _batches(), visit=visit, device="cpu")
    for h in handles:
        h.remove()
    for a, b in zip(acc, stats_full()):
        torch.testing.assert_close(a, b)


def test_a_block_the_forward_never_calls_is_an_error(llama: nn.Module) -> None:
    with pytest.raises(ValueError, match="did not call"):
        first_block_inputs(llama, nn.Linear(2, 2), _batches())
