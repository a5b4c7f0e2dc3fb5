"""State-space mixers (Hugging Face Mamba) with a selective scan ``torch.export`` keeps symbolic in time.

Without CUDA kernels a Mamba mixer runs ``slow_forward``, whose recurrence is a Python loop over the
tokens: ``torch.export`` unrolls it, so an engine captured from it is fixed at the example's length.
``scan_friendly_ssm`` gives each such mixer, for the time of an engine export only, the same
computation with the recurrence written as ``torch._higher_order_ops.scan`` (ONNX ``Scan``), so the
sequence length stays dynamic. Mixers are found by structure (``A_log``, ``D``, ``in_proj``,
``conv1d``, ``x_proj``, ``dt_proj``, ``out_proj`` and the size attributes ``slow_forward`` reads),
and each is checked against its own ``slow_forward`` on a random input before it is swapped; one
that differs keeps its loop. The coupling analysis never sees the scan: it runs on the loop.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_CHILDREN = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj", "act")
_SIZES = ("intermediate_size", "ssm_state_size", "time_step_rank")


def _is_mixer(mod: nn.Module) -> bool:
    return (all(isinstance(getattr(mod, c, None), nn.Module) for c in _CHILDREN)
            and all(isinstance(getattr(mod, s, None), int) for s in _SIZES)
            and isinstance(getattr(mod, "A_log", None), torch.Tensor) and isinstance(getattr(mod, "D", None), torch.Tensor)
            and callable(getattr(type(mod), "slow_forward", None)))


def scan_slow_forward(self: Any, input_states: torch.Tensor, cache_params: Any = None, cache_position: Any = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``MambaMixer.slow_forward`` without a cache, its recurrence as one ``scan`` over time."""
    from torch._higher_order_ops.scan import scan

    if cache_params is not None:  # decoding with a cache: the module's own code
        return type(self).slow_forward(self, input_states, cache_params, cache_position, attention_mask)
    batch_size, seq_len, _ = input_states.shape
    dtype = input_states.dtype
    hidden_states, gate = self.in_proj(input_states).transpose(1, 2).chunk(2, dim=1)
    if attention_mask is not None:
        hidden_states = hidden_states * attention_mask.unsqueeze(1)
    ssm_state = torch.zeros((batch_size, self.intermediate_size, self.ssm_state_size),
                            device=hidden_states.device, dtype=dtype)
    hidden_states = self.act(self.conv1d(hidden_states)[..., :seq_len])
    if attention_mask is not None:
        hidden_states = hidden_states * attention_mask.unsqueeze(1)
    time_step, b, c = torch.split(self.x_proj(hidden_states.transpose(1, 2)),
                                  [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
    dt = nn.functional.softplus(self.dt_proj(time_step)).transpose(1, 2)
    a = -torch.exp(self.A_log.float())
    discrete_a = torch.exp(a[None, :, None, :] * dt[:, :, :, None])
    delta_b_u = dt[:, :, :, None] * b[:, None, :, :].float() * hidden_states[:, :, :, None].float()

    def step(h: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        a_t, bu_t, c_t = xs
        h = a_t * h + bu_t
        # a product and a sum, not ``h @ c``: the ONNX exporter's decomposition of a matmul in the
        # scan body leaves a size where a tensor is expected
        return h, (h * c_t.unsqueeze(1)).sum(-1)

    _, ys = scan(step, ssm_state, (discrete_a.permute(2, 0, 1, 3), delta_b_u.permute(2, 0, 1, 3), c.transpose(0, 1)))
    out = ys.permute(1, 2, 0).to(dtype) + hidden_states * self.D[None, :, None]
    out = out * self.act(gate)
    return self.out_proj(out.transpose(1, 2))


def _agrees(mod: Any) -> bool:
    p = next(mod.parameters())
    hidden = int(mod.in_proj.weight.shape[1])
    x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    try:
        with torch.no_grad():
            want = type(mod).slow_forward(mod, x)
            got = scan_slow_forward(mod, x)
    except Exception:  # the module's code differs from what the scan version assumes
        return False
    scale = max(1.0, float(want.abs().max()))
    return got.shape == want.shape and float((got - want).abs().max()) <= 1e-5 * scale


@contextlib.contextmanager
def scan_friendly_ssm(model: nn.Module) -> Iterator[int]:
    """Within the block, every Mamba mixer of ``model`` that agrees with it runs the scan version;
    yields how many do."""
    swapped: list[Any] = [m for m in model.modules() if _is_mixer(m) and _agrees(m)]
    for m in swapped:
        m.slow_forward = types.MethodType(scan_slow_forward, m)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.slow_forward
