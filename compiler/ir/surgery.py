"""Surgery: physically smaller students from keep-decisions over coupled groups and blocks.

``prune_width`` slices every member of every pruned group (new, smaller tensors; no masks left)
and updates module attributes (``out_channels``, ``in_features``, ``num_features``, ``groups``,
``normalized_shape``, head counts) and Hugging Face config fields (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ``hidden_size``) so the student saves, reloads
and runs. ``remove_blocks`` drops whole blocks and renumbers what depends on layer indices.

Exactness invariant (tested over random architectures): for groups marked ``exact``, the pruned
student computes what ``masked_reference`` computes: the teacher with the dropped units' slices
zeroed in every member (producer rows, norm affine, consumer columns).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from potstill.errors import InputError
from potstill.ir.cow import TensorSlots, shared_copy
from torch import nn

if TYPE_CHECKING:
    from potstill.ir.types import Analysis, CoupledGroup

#: attribute block removal leaves on a student: container -> the teacher index of each kept child
#: (``students_io`` records it so ``load_student`` removes the same blocks from a fresh teacher)
BLOCK_ORIGIN_ATTR = "_potstill_block_origin"

#: Hugging Face FFN input projections: their width is ``config.intermediate_size``
HF_FFN_MODULES = ("intermediate.dense", "mlp.up_proj", "mlp.gate_proj", "mlp.fc1", "mlp.c_fc", "mlp.dense_h_to_4h",
                  "ffn.lin1", "mlp.fc_in")


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    t = getattr(mod, attr)
    if not isinstance(t, torch.Tensor):
        raise KeyError(name)
    return t


def _drop_plan(analysis: Analysis, keep: Mapping[int, Sequence[int]]) -> dict[tuple[str, int], set[int]]:
    drops: dict[tuple[str, int], set[int]] = {}
    for gid, units in keep.items():
        if gid < 0 or gid >= len(analysis.groups):
            raise InputError(f"no coupled group {gid}; the model has groups 0..{len(analysis.groups) - 1}")
        g = analysis.groups[gid]
        kept = sorted({int(u) for u in units})
        if g.pinned and len(kept) != g.n_units:
            raise InputError(f"group {g.describe()} is pinned ({g.pinned}); it cannot be pruned")
        if not kept:
            raise InputError(f"group {g.describe()}: keep at least one unit")
        if kept[0] < 0 or kept[-1] >= g.n_units:
            raise InputError(f"group {g.describe()}: unit indices must lie in 0..{g.n_units - 1}")
        dropped = sorted(set(range(g.n_units)) - set(kept))
        if not dropped:
            continue
        for m in g.members:
            drops.setdefault((m.param, m.dim), set()).update(g.positions(m, dropped))
    return drops


def prune_width(model: nn.Module, analysis: Analysis, keep: Mapping[int, Sequence[int]]) -> nn.Module:
    """A physically smaller copy of ``model`` keeping the given units of each group.

    Tensors that are not sliced stay shared with ``model`` (``potstill.ir.cow``): give the copy its own
    (``potstill.ir.cow.unshare``) before writing into it in place."""
    drops = _drop_plan(analysis, keep)
    new = shared_copy(model)  # sliced tensors get new storage; the rest stay shared (potstill.ir.cow)
    slots = TensorSlots(new)
    for (name, dim), dropped in sorted(drops.items()):
        t = _get_tensor(new, name)
        idx = torch.tensor([i for i in range(t.shape[dim]) if i not in dropped], dtype=torch.long, device=t.device)
        slots.replace(t, t.detach().index_select(dim, idx).contiguous())
    kept_ratio = _kept_ratio(analysis, keep)
    _update_attributes(new, analysis, kept_ratio)
    via_pruned_heads = _record_pruned_heads(new, analysis, keep)
    _update_hf_config(new, heads=not via_pruned_heads)
    return new


def _layer_index(path: str) -> int | None:
    parts = path.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layer", "layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _record_pruned_heads(model: nn.Module, analysis: Analysis, keep: Mapping[int, Sequence[int]]) -> bool:
    """Hugging Face models that derive the head size from ``hidden_size / num_attention_heads``
    (BERT, ViT, ...) describe removed heads in ``config.pruned_heads``; ``from_pretrained`` then
    rebuilds the pruned shapes. Returns whether that route was taken."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "pruned_heads") or not hasattr(model, "prune_heads"):
        return False
    # ``from_pretrained`` replays ``config.pruned_heads`` through the base model's ``_prune_heads``,
    # which most current decoders (OPT, Mistral, Qwen2, Phi, ...) no longer have
    if not callable(getattr(getattr(model, "base_model", model), "_prune_heads", None)):
        return False
    if getattr(config, "head_dim", None) is not None:
        return False  # the config states the head size itself (Llama-style): head counts suffice
    pruned = {int(k): set(v) for k, v in dict(config.pruned_heads).items()}
    for gid, units in keep.items():
        g = analysis.groups[gid]
        if g.kind not in ("heads", "kv_heads"):
            continue
        q = [m for m in g.members if m.role == "out" and m.dim == 0 and m.module.rsplit(".", 1)[-1] in _Q_NAMES]
        layer = _layer_index(q[0].module) if q else None
        if layer is None:
            return False
        total = g.n_units + len(pruned.get(layer, ()))
        original = [h for h in range(total) if h not in pruned.get(layer, set())]
        removed = {original[u] for u in range(g.n_units) if u not in set(units)}
        pruned.setdefault(layer, set()).update(removed)
        for name, mod in model.named_modules():
            if _layer_index(name) == layer and isinstance(getattr(mod, "pruned_heads", None), set):
                mod.pruned_heads = set(pruned[layer])
    config.pruned_heads = {k: sorted(v) for k, v in pruned.items() if v}
    return True


def _kept_ratio(analysis: Analysis, keep: Mapping[int, Sequence[int]]) -> dict[str, float]:
    """param -> fraction of its dim 0 kept (pieces of several groups add up)."""
    out: dict[str, float] = {}
    for g in analysis.groups:
        kept = len(set(keep[g.id])) if g.id in keep else g.n_units
        for m in g.members:
            if m.dim == 0:
                size = analysis.param_shapes[m.param][0]
                out[m.param] = out.get(m.param, 0.0) + (g.n_units * m.unit_len / size) * kept / g.n_units
    return out


def _update_attributes(model: nn.Module, analysis: Analysis, kept: dict[str, float]) -> None:
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.modules.conv._ConvNd):
            w = mod.weight
            g0 = analysis.conv_groups.get(prefix + "weight", mod.groups)
            if g0 > 1 and prefix + "weight" in kept:
                mod.groups = round(g0 * kept[prefix + "weight"])
            if mod.transposed:
                mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
            else:
                mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            if ref is not None:
                mod.num_features = ref.shape[0]
        elif isinstance(mod, nn.GroupNorm):
            if mod.weight is not None:
                if prefix + "weight" in kept:
                    mod.num_groups = round(mod.num_groups * kept[prefix + "weight"])
                mod.num_channels = mod.weight.shape[0]
        elif isinstance(mod, nn.LayerNorm):
            if mod.weight is not None:
                mod.normalized_shape = tuple(mod.weight.shape)
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        _update_module_kinds(mod)
        _update_attention(mod)
        if not _update_ssm_heads(mod):
            _update_own_widths(mod, prefix, analysis.param_shapes)


def _update_module_kinds(mod: nn.Module) -> None:
    """Size attributes of the module kinds the op rules prune beyond conv/linear/norm/embedding:
    ``PReLU(num_parameters)``; Hugging Face ``Conv1D`` (GPT-2: ``x @ W + b`` with ``W`` as
    ``[nx, nf]``) and the fused-QKV attention that splits its output (``split_size``, heads)."""
    if isinstance(mod, nn.PReLU):
        mod.num_parameters = mod.weight.numel()
    elif type(mod).__name__ == "Conv1D" and isinstance(w := getattr(mod, "weight", None), torch.Tensor):
        mod.nx = int(w.shape[0])  # type: ignore[assignment]
        mod.nf = int(w.shape[1])  # type: ignore[assignment]
    fused = getattr(mod, "c_attn", None)
    head_dim = getattr(mod, "head_dim", None)
    if isinstance(getattr(mod, "split_size", None), int) and type(fused).__name__ == "Conv1D" and isinstance(head_dim, int):
        q_attn = getattr(mod, "q_attn", None)  # cross-attention: c_attn holds K and V only
        parts = 2 if getattr(mod, "is_cross_attention", False) and q_attn is not None else 3
        width = fused.weight.shape[1] // parts  # type: ignore[union-attr]
        mod.split_size = width  # type: ignore[assignment]
        mod.num_heads = width // head_dim  # type: ignore[assignment]


#: names of the size attributes ``_update_own_widths`` may update (``intermediate_size``, ``d_inner``, ...)
_WIDTH_ATTR_SUFFIXES = ("_size", "_dim")
_WIDTH_ATTR_NAMES = ("d_inner", "d_state", "inner_dim")


def _update_own_widths(mod: nn.Module, prefix: str, teacher_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Size attributes of a module that holds parameters of its own along a pruned width.

    A mixer that sizes a tensor it makes by an attribute (Mamba's scan state,
    ``torch.zeros(b, self.intermediate_size, self.ssm_state_size)``) must follow its own
    parameters (``A_log``, ``D``): every width attribute whose value is the unpruned size of one of
    their dims takes that dim's new size. A size that two of its dims share and that only one of
    them changes (or changes differently) is ambiguous and left alone; the trial surgery of
    ``potstill.ir.surgery_probe`` pins the groups whose narrowed forward still fails. PyTorch's own
    modules (``nn.Linear``, convolutions, norms) are updated by ``_update_attributes``."""
    if type(mod).__module__.startswith("torch.") or _is_hf_conv1d(mod):
        return
    resized: dict[int, set[int]] = {}
    for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
        before = teacher_shapes.get(prefix + pname)
        if t is None or before is None or len(before) != t.dim():
            continue
        for old, new in zip(before, t.shape):
            resized.setdefault(int(old), set()).add(int(new))
    changes = {old: next(iter(new)) for old, new in resized.items() if len(new) == 1 and old not in new}
    if not changes:
        return
    for attr, value in list(vars(mod).items()):
        if attr.startswith("_") or not isinstance(value, int) or isinstance(value, bool) or value not in changes:
            continue
        if attr.endswith(_WIDTH_ATTR_SUFFIXES) or attr in _WIDTH_ATTR_NAMES:
            setattr(mod, attr, changes[value])


_SSM_HEAD_ATTRS = ("num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size", "conv_dim")


def _update_ssm_heads(mod: nn.Module) -> bool:
    """Mamba2's mixer: heads of ``head_dim`` channels in groups that share a B and a C of
    ``ssm_state_size`` each. Its widths follow its parameters, not one another's old values: the
    heads count ``A_log``'s entries, the convolution runs over the inner width and both B and C,
    ``conv_dim = intermediate_size + 2 * n_groups * ssm_state_size``. (Matching old values, as
    ``_update_own_widths`` does, would also rewrite ``conv_kernel_size`` where it equals the head
    count.) Returns whether ``mod`` is such a mixer."""
    a_log, conv = getattr(mod, "A_log", None), getattr(mod, "conv1d", None)
    if (not isinstance(a_log, torch.Tensor) or a_log.dim() != 1 or not isinstance(conv, nn.Conv1d)
            or any(not isinstance(getattr(mod, n, None), int) for n in _SSM_HEAD_ATTRS)):
        return False
    widths: dict[str, int] = {n: getattr(mod, n) for n in _SSM_HEAD_ATTRS}
    heads = int(a_log.shape[0])
    inner = heads * widths["head_dim"]
    conv_dim = int(conv.weight.shape[0])
    per_group = 2 * widths["ssm_state_size"]
    if (conv_dim - inner) % per_group or conv_dim <= inner:
        return False
    for name, value in (("num_heads", heads), ("intermediate_size", inner), ("conv_dim", conv_dim),
                        ("n_groups", (conv_dim - inner) // per_group)):
        setattr(mod, name, value)
    return True


def _is_hf_conv1d(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(getattr(mod, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.dim() == 2)


_Q_NAMES = ("query", "q_proj", "q", "q_lin", "wq", "to_q")
_K_NAMES = ("key", "k_proj", "k", "k_lin", "wk", "to_k")
#: fused Q/K/V projections (GPT-2's Conv1D ``c_attn``, GPT-NeoX ``query_key_value``, ...), 3 x heads wide
_QKV_NAMES = ("c_attn", "query_key_value", "qkv_proj", "qkv", "Wqkv", "in_proj")


def _child_linear(mod: nn.Module, names: Iterable[str]) -> nn.Linear | None:
    for n in names:
        c = getattr(mod, n, None)
        if isinstance(c, nn.Linear):
            return c
    return None


def _out_width(mod: nn.Module | None) -> int | None:
    if isinstance(mod, nn.Linear):
        return int(mod.weight.shape[0])
    w = getattr(mod, "weight", None)
    if mod is not None and _is_hf_conv1d(mod) and isinstance(w, torch.Tensor):
        return int(w.shape[1])
    return None


#: attribute names of the query-head count, the KV-head count and the head size across HF families
_HEADS_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
_HEAD_DIM_ATTRS = ("attention_head_size", "head_dim", "head_size")
#: attributes that hold ``heads * head_dim`` (the width of the attention's concatenated heads):
#: BERT-likes' ``all_head_size``, GPT-2's ``split_size`` (its fused QKV split), DistilBERT's ``dim``
_ALL_HEADS_ATTRS = ("all_head_size", "split_size", "dim")
#: attributes that hold ``heads * head_dim`` in some families and the residual width in others
#: (BART-likes' ``embed_dim``: MVP reshapes its concatenated heads to it): updated only where the
#: value equals the unpruned ``heads * head_dim``, i.e. where it can be the concatenated width
_MAYBE_ALL_HEADS_ATTRS = ("embed_dim",)


def _int_attr(mod: nn.Module, names: Iterable[str]) -> int | None:
    for n in names:
        v = getattr(mod, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def attention_counts(mod: nn.Module) -> dict[str, int]:
    """``{"heads", "kv_heads", "head_dim"}`` of an attention module with Q/K projections, else ``{}``.

    Counts come from the projections' widths (they are what the weights hold), never from the config.
    """
    head_dim = _int_attr(mod, _HEAD_DIM_ATTRS)
    if head_dim is None:
        return {}
    q = _child_linear(mod, _Q_NAMES)
    if q is None:
        fused = next((w for n in _QKV_NAMES if (w := _out_width(getattr(mod, n, None))) is not None), None)
        if fused is None or fused % (3 * head_dim):
            return {}
        return {"heads": fused // (3 * head_dim), "head_dim": head_dim, "kv_heads": fused // (3 * head_dim)}
    out = {"heads": q.weight.shape[0] // head_dim, "head_dim": head_dim}
    k = _child_linear(mod, _K_NAMES)
    if k is not None:
        out["kv_heads"] = k.weight.shape[0] // head_dim
    return out


def _update_attention(mod: nn.Module) -> None:
    """Head counts of attention modules follow their (pruned) Q/K projections.

    Slicing q/k/v/o per head (or KV group) leaves the module's bookkeeping to update: every count
    attribute the family has (by presence, so older and newer transformers both work), the
    concatenated-heads width, and the GQA repeat factor ``num_key_value_groups = heads / kv_heads``.
    ``_prune_heads`` is never needed.
    """
    counts = attention_counts(mod)
    if not counts:
        return
    heads, head_dim = counts["heads"], counts["head_dim"]
    before = _int_attr(mod, _HEADS_ATTRS)
    for attr in _MAYBE_ALL_HEADS_ATTRS:
        if before is not None and before != heads and _int_attr(mod, (attr,)) == before * head_dim:
            setattr(mod, attr, heads * head_dim)
    for attr in _HEADS_ATTRS:
        if _int_attr(mod, (attr,)) is not None:
            setattr(mod, attr, heads)
    for attr in _ALL_HEADS_ATTRS:
        if _int_attr(mod, (attr,)) is not None:
            setattr(mod, attr, heads * head_dim)
    kv = counts.get("kv_heads")
    if kv:
        for attr in _KV_ATTRS:
            if _int_attr(mod, (attr,)) is not None:
                setattr(mod, attr, kv)
        if _int_attr(mod, ("num_key_value_groups",)) is not None:
            mod.num_key_value_groups = heads // kv  # type: ignore[assignment]


def _first_uniform(values: list[int]) -> tuple[int | None, bool]:
    return (values[0] if values else None), len(set(values)) <= 1


def _update_hf_config(model: nn.Module, heads: bool = True) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    head_counts: list[int] = []
    kv_heads: list[int] = []
    ffn: list[int] = []
    for name, mod in model.named_modules():
        counts = attention_counts(mod)
        if counts:
            head_counts.append(counts["heads"])
            if "kv_heads" in counts:
                kv_heads.append(counts["kv_heads"])
        if name.endswith(HF_FFN_MODULES) and isinstance(mod, nn.Linear):
            ffn.append(mod.weight.shape[0])
        elif (isinstance(inner := getattr(mod, "intermediate_size", None), int) and not isinstance(inner, bool)
              and any(True for _ in mod.parameters(recurse=False))):
            ffn.append(inner)  # a mixer with parameters of its own at that width (Mamba's A_log, D)
    nonuniform = []
    fields = [("num_attention_heads", head_counts), ("num_key_value_heads", kv_heads)] if heads else []
    for field_name, values in (*fields, ("intermediate_size", ffn)):
        first, uniform = _first_uniform(values)
        if first is None or not hasattr(config, field_name):
            continue
        setattr(config, field_name, first)
        if not uniform:
            nonuniform.append(field_name)
    get_emb = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_emb() if callable(get_emb) else None
    except (NotImplementedError, AttributeError):
        # vision models have no input embeddings: ResNet, ConvNeXt, ... say so; PoolFormer's
        # accessor reads an ``embeddings`` attribute its model never defines
        emb = None
    if isinstance(emb, nn.Embedding) and hasattr(config, "hidden_size"):
        config.hidden_size = emb.embedding_dim
    _update_ssm_config(model, config, nonuniform)
    if nonuniform:
        config.potstill_nonuniform = nonuniform


def _update_ssm_config(model: nn.Module, config: Any, nonuniform: list[str]) -> None:
    """A Mamba2 config states its mixers' heads, groups and inner width (``expand * hidden_size``);
    hybrids name theirs otherwise (``mamba_n_heads``) and are left alone."""
    if not all(isinstance(getattr(config, f, None), (int, float)) for f in ("num_heads", "n_groups", "expand",
                                                                             "head_dim", "hidden_size")):
        return
    mixers = [m for m in model.modules() if _update_ssm_heads(m)]
    if not mixers:
        return
    for field_name in ("num_heads", "n_groups"):
        first, uniform = _first_uniform([int(vars(m)[field_name]) for m in mixers])
        setattr(config, field_name, first)
        if not uniform:
            nonuniform.append(field_name)
    config.expand = config.num_heads * config.head_dim / config.hidden_size


# ---------------------------------------------------------------------------------------------


def remove_blocks(model: nn.Module, analysis: Analysis, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` without the named blocks (see ``Analysis.blocks``); its tensors are
    shared with ``model`` (``potstill.ir.cow``)."""
    known = {b.name: b for b in analysis.blocks}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"not removable blocks: {unknown}; blocks are: {', '.join(known) or 'none'}")
    new = shared_copy(model)
    by_container: dict[str, set[int]] = {}
    for n in names:
        by_container.setdefault(known[n].container, set()).add(known[n].index)
    for cname, drop in by_container.items():
        if len(drop) >= len(list(new.get_submodule(cname).children())):
            raise InputError(f"removing every block of '{cname}' leaves nothing; keep at least one")
    return drop_children(new, by_container)


def drop_children(new: nn.Module, by_container: Mapping[str, set[int]], *, layers: bool = True) -> nn.Module:
    """Remove, in place, the children at the given indices of each container; renumber ``layer_idx``
    and the config's layer count (``layers``: the containers hold layers, not e.g. a mixture's
    experts); remember each kept child's teacher index (``students_io``)."""
    origin: dict[str, list[int]] = dict(getattr(new, BLOCK_ORIGIN_ATTR, {}) or {})
    for cname, drop in by_container.items():
        container = new.get_submodule(cname)
        children = list(container.named_children())
        before = origin.get(cname, list(range(len(children))))
        origin[cname] = [o for i, o in enumerate(before) if i not in drop]
        kept = [(n, c) for i, (n, c) in enumerate(children) if i not in drop]
        if isinstance(container, nn.ModuleList):
            replacement: nn.Module = nn.ModuleList([c for _, c in kept])
        else:
            replacement = nn.Sequential(OrderedDict((str(i), c) for i, (_, c) in enumerate(kept)))
        parent_name, _, attr = cname.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, attr, replacement)
        if layers and isinstance(replacement, nn.ModuleList):
            for i, layer in enumerate(replacement):
                for sub in layer.modules():
                    if isinstance(getattr(sub, "layer_idx", None), int):
                        sub.layer_idx = i  # type: ignore[assignment]
    config = getattr(new, "config", None)
    if layers and config is not None and hasattr(config, "num_hidden_layers") and len(by_container) == 1:
        cname, drop = next(iter(by_container.items()))
        container = new.get_submodule(cname)
        if isinstance(container, nn.ModuleList) and config.num_hidden_layers == len(container) + len(drop):
            config.num_hidden_layers = len(container)
            layer_types = getattr(config, "layer_types", None)
            if isinstance(layer_types, list) and len(layer_types) == len(container) + len(drop):
                config.layer_types = [t for i, t in enumerate(layer_types) if i not in drop]
            pruned = getattr(config, "pruned_heads", None)
            if isinstance(pruned, dict) and pruned:  # keyed by layer index: follow the renumbering
                by_layer = {int(k): v for k, v in pruned.items()}
                survivors = [i for i in range(len(container) + len(drop)) if i not in drop]
                config.pruned_heads = {j: by_layer[i] for j, i in enumerate(survivors) if i in by_layer}
    setattr(new, BLOCK_ORIGIN_ATTR, origin)
    return new


def masked_reference(model: nn.Module, analysis: Analysis, keep: Mapping[int, Sequence[int]]) -> nn.Module:
    """The teacher with every dropped unit's slices zeroed in all members (same shapes)."""
    drops = _drop_plan(analysis, keep)
    new = copy.deepcopy(model)
    for (name, dim), dropped in drops.items():
        t = _get_tensor(new, name)
        if not t.is_floating_point():
            continue
        idx = torch.tensor(sorted(dropped), dtype=torch.long, device=t.device)
        with torch.no_grad():
            t.data.index_fill_(dim, idx, 0.0)
    return new


def keep_top(group: CoupledGroup, scores: Any, n_keep: int) -> list[int]:
    """Indices of the ``n_keep`` highest-scoring units of a group, in ascending order."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.numel() != group.n_units:
        raise ValueError(f"{group.describe()}: {s.numel()} scores for {group.n_units} units")
    n_keep = max(1, min(group.n_units, int(n_keep)))
    return sorted(torch.topk(s, n_keep).indices.tolist())
