"""Post-training INT8 of the ONNX model, kept only when it pays and stays accurate.

Two ways, chosen by the profile's ``int8.mode`` (``auto`` reads the graph): *static*, where
``nncf.quantize`` inserts QuantizeLinear/DequantizeLinear pairs calibrated on ``nncf.Dataset`` feeds
(the calibration batches, or random inputs in the example's range when none are given), for
convolutional nets; and *dynamic*, ONNX Runtime's ``quantize_dynamic`` (per-channel INT8 weights,
activation scales computed per batch at run time), for graphs of matrix products: on
all-MiniLM-L6-v2 it kept mean cosine 0.993 to the FP32 engine at 2.0x its speed on this host.
Where dynamic INT8 is rejected, ``auto`` tries *weight-only* INT8 next: ONNX Runtime's
MatMulNBits, 8-bit weights in blocks of 128 inputs with activations quantised per block at run
time. On SmolLM2-135M (8 x 64 tokens), dynamic INT8 ran 2.5x faster at 2.3x the perplexity;
weight-only ran 1.3x faster at 1.035x. With real calibration data, dynamic INT8 is also built from
the graph rescaled by SmoothQuant (``potstill.targets.smoothquant``), and that engine replaces the
plain one only where it measures better (``smooth_if_better``).
Models under ``int8.min_macs`` are not tried.
The INT8 engine is kept only if it is faster than FP32 by the profile's ``int8.min_speedup`` *and*
within its budget: ``rel = max|int8 − torch| / max|torch| <= int8.max_rel_error`` and, for
classifier-shaped outputs ``[batch, classes]``, top-1 disagreement with PyTorch on held-out inputs
``<= int8.max_accuracy_drop`` (a bound on the accuracy drop), measured on the example plus the
calibration batches when there are any (the data distribution INT8 was calibrated for), else on
random look-alikes of the example. A causal language model with real calibration text is judged
instead by perplexity: the engine's on that text's next tokens over PyTorch's
``<= int8.max_perplexity_ratio``. Otherwise FP32 is kept. Either way
the notes record the decision and both latencies: INT8 is measured per model, never assumed
(a ResNet-18 ran 2.5× faster in INT8 here, EfficientNet-Lite0 slower).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from potstill.errors import InputError
from potstill.inputs.data import iter_batches
from potstill.outputs.atomic import atomic_path
from potstill.profiles import DeviceProfile, Tolerance
from torch import nn

from .artifact import Artifact
from .onnx_export import OnnxExport, flat_spec
from .onnxruntime import OrtRunner, fixed_batch, lower_onnxruntime, make_session
from .parity import Inputs, check_parity, errors, held_out_inputs, kept_positions, torch_reference
from .speedup import TeacherClock
from .timing import time_callable


def calibration_inputs(
    calib: Callable[[], Iterable[Any]] | Iterable[Any] | None,
    example: Inputs,
    samples: int,
) -> tuple[list[Inputs], str]:
    """Calibration (args, kwargs) pairs, at most ``samples`` examples, and where they came from."""
    if calib is not None:
        out: list[Inputs] = []
        seen = 0
        for batch in iter_batches(calib):
            out.append((tuple(batch.args), dict(batch.kwargs)))
            seen += batch.size
            if seen >= samples:
                break
        if out:
            return out, f"{seen} calibration samples from the calibration data"
    n = max(1, min(samples, 32))
    randoms = held_out_inputs(*example, n_random=n, seed=1234)[1:]
    return randoms, f"no calibration data: {n} random inputs in the example's value range"


@contextlib.contextmanager
def quiet_logger(logger: logging.Logger) -> Iterator[None]:
    """``logger`` shows errors only inside the block, its own level restored after."""
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def products_saturate() -> bool:
    """Whether this CPU's 8-bit integer products can saturate, so weights must be quantised to 7 bits.

    An x86 CPU without VNNI multiplies u8 activations by s8 weights with VPMADDUBSW, whose 16-bit
    pair sums overflow for large weights: ONNX Runtime's quantisation guide asks for ``reduce_range``
    there, and NNCF has its overflow fix for it. On an AVX2-only host (AMD EPYC, family 25 model 1)
    dynamic INT8 of SmolLM2-135M with 8-bit weights gave perplexity 236,900x the FP32 engine's and no
    next token right; with 7-bit weights 1.98x and 0.47 (the check rejects both, but MiniLM's passes).
    Arm and VNNI hosts keep 8 bits. Where torch cannot tell (its probe is private), 7 bits: a little
    precision lost rather than an engine that computes something else."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return True if vnni is None else not vnni()


#: said of an INT8 engine built with 7-bit weights
SEVEN_BITS = "7-bit weights: this CPU has no VNNI, where 8-bit weights saturate its integer products"


def quantize_onnx(fp32_path: Path, out_path: Path, feeds: Sequence[dict[str, np.ndarray]],
                  samples: int, *, transformer: bool = False) -> Path:
    """NNCF post-training INT8 of the ONNX model at ``fp32_path``; written atomically to ``out_path``.
    Weights of every convolution and matrix product take 7 bits where ``products_saturate``
    (NNCF's overflow fix; by default it covers only the first convolution)."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    nncf.set_log_level(logging.ERROR)
    model = onnx.load(str(fp32_path))
    extra: dict[str, Any] = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    if products_saturate():
        extra["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(
            model, nncf.Dataset(list(feeds)), subset_size=max(1, min(samples, len(feeds) * 64)),
            preset=nncf.QuantizationPreset.PERFORMANCE, **extra,
        )
    with atomic_path(out_path) as tmp:
        onnx.save(quantized, str(tmp))
    return out_path


def quantize_dynamic_onnx(fp32_path: Path, out_path: Path) -> Path:
    """ONNX Runtime dynamic INT8 of the model at ``fp32_path`` (per-channel INT8 weights of every
    MatMul/Gemm, 7-bit where ``products_saturate``; activation scales computed per batch at run
    time, so nothing is calibrated); written atomically to ``out_path``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # it logs pre-processing advice on the root logger: quiet it here only
    with quiet_logger(logging.getLogger()), atomic_path(out_path) as tmp:
        quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=products_saturate(),
                         use_external_data_format=Path(fp32_path).stat().st_size > 1_800_000_000)
    return out_path


@dataclass
class EngineError:
    """How far an INT8 engine is from PyTorch: ``value`` (a language model's perplexity over PyTorch's
    on real text, else the squared error over the squared reference), its name, and the worst
    ``rel`` (max-abs error over the reference's max) that the INT8 budget reads."""

    value: float
    measure: str
    rel: float

    def within(self, opts: Any) -> bool:
        """Whether the profile's INT8 budget (``profile.int8``) passes it; NaN and inf never do."""
        if not math.isfinite(self.value):
            return False
        if self.measure == PERPLEXITY:
            return self.value <= opts.max_perplexity_ratio
        return self.rel <= opts.max_rel_error


PERPLEXITY = "perplexity over FP32's"


def int8_error(module: nn.Module, runner: Callable[[Inputs], np.ndarray], inputs: Sequence[Inputs],
               ppl_inputs: Sequence[Inputs]) -> EngineError:
    """How far an INT8 engine is from PyTorch, to choose between two engines: a language model's
    perplexity over PyTorch's on ``ppl_inputs`` (real text), else the squared error over the squared
    reference at the positions the attention mask keeps, summed over ``inputs``. A shape mismatch,
    NaN or infinity is ``inf``."""
    ppl = perplexity_ratio(module, runner, ppl_inputs) if ppl_inputs else None
    if ppl is not None:
        return EngineError(ppl if math.isfinite(ppl) else math.inf, PERPLEXITY, math.nan)
    num = den = worst = 0.0
    for item in inputs:
        ref, got = torch_reference(module, item), np.asarray(runner(item), np.float64)
        if got.shape != ref.shape:
            return EngineError(math.inf, "relative squared error", math.inf)
        keep = kept_positions(item, ref.shape)
        if keep is not None:
            ref, got = ref[keep], got[keep]
        num += float(np.square(got - ref).sum())
        den += float(np.square(ref).sum())
        rel = errors(got, ref)[1]
        worst = rel if math.isnan(rel) else max(worst, rel)  # max() would drop a NaN
        if not math.isfinite(worst):
            return EngineError(math.inf, "relative squared error", math.inf)
    err = num / den if den > 0 else num
    if not math.isfinite(err):
        return EngineError(math.inf, "relative squared error", math.inf)
    return EngineError(err, "relative squared error", worst)


#: SmoothQuant is not tried on graphs whose weights pass this size: their INT8 engine needs external data
SMOOTHQUANT_MAX_BYTES = 1_800_000_000


#: the limits on SmoothQuant's strength tried in turn, each only where the one before gave an engine
#: outside the INT8 budget: a stronger migration lowers the mean error but can raise the worst element
#: (all-MiniLM-L6-v2's teacher: worst rel 0.089 unsmoothed, 0.088 up to 0.3, 0.113 up to 0.5, 0.145 up to 0.9)
ALPHA_LIMITS = (1.0, 0.5, 0.3)


def smooth_if_better(module: nn.Module, fp32_path: Path, int8_path: Path, stat_feeds: Sequence[dict[str, np.ndarray]],
                     open_runner: Callable[[Path], OrtRunner], judge: Sequence[Inputs], ppl_inputs: Sequence[Inputs],
                     profile: DeviceProfile) -> str:
    """Dynamic INT8 of the SmoothQuant-rescaled graph (``potstill.targets.smoothquant``, statistics over
    the engine feeds ``stat_feeds``) replaces the plain one at ``int8_path`` only when it measures better on ``judge``
    (or by perplexity on ``ppl_inputs``): within the profile's INT8 budget where the plain one is
    not, or else with the lower error. The strength limits of ``ALPHA_LIMITS`` are tried in turn
    until an engine is within the budget; a language model judged by perplexity, a mean the
    weaker limits do not lower, takes the first alone. Returns the note that says what was kept and why."""
    from .smoothquant import SmoothQuant

    size = fp32_path.stat().st_size + sum(p.stat().st_size for p in fp32_path.parent.glob(f"{fp32_path.name}*.data"))
    if size > SMOOTHQUANT_MAX_BYTES:
        return f"SmoothQuant not tried: {size / 1e9:.1f} GB of FP32 weights"
    smoothed = int8_path.with_name("model.smoothed.onnx")
    candidate = int8_path.with_name("model.int8-smoothed.onnx")
    opts = profile.int8

    def rank(e: EngineError) -> tuple[bool, float]:  # within the budget first, then the lower error
        return not e.within(opts), e.value

    try:
        stats = SmoothQuant(fp32_path, stat_feeds, lambda path: make_session(path, profile)[0], int8_path.parent)
        plain = best = int8_error(module, open_runner(int8_path), judge, ppl_inputs)
        kept, tried = None, []
        for limit in ALPHA_LIMITS:
            report = stats.write(smoothed, weight_bits=7 if products_saturate() else 8, max_alpha=limit)
            if not report.groups:
                continue
            quantize_dynamic_onnx(smoothed, candidate)
            err = int8_error(module, open_runner(candidate), judge, ppl_inputs)
            tried.append(f"up to alpha {limit:g}: {err.value:.4g}" + ("" if err.measure == PERPLEXITY else f", worst rel {err.rel:.3g}"))
            if rank(err) < rank(best):
                os.replace(candidate, int8_path)
                best, kept = err, report
            if err.within(opts) or err.measure == PERPLEXITY:  # perplexity reads the mean error alone
                break
        if not tried:
            return f"SmoothQuant not kept: no rescaling lowered the simulated INT8 error of the {stats.candidates} " \
                   "activations it could rescale"
        measured = (f"{plain.measure} {plain.value:.4g} unsmoothed"
                    + ("" if plain.measure == PERPLEXITY else f", worst rel {plain.rel:.3g}") + "; " + "; ".join(tried))
        if kept is None:
            return f"SmoothQuant not kept ({measured})"
        return f"{kept.describe()}: kept ({measured})"
    finally:
        for path in (smoothed, candidate):
            for leftover in (path, path.with_name(f"{path.name}.data")):
                leftover.unlink(missing_ok=True)


#: per INT8 mode: the tool that quantises (recorded on the engine) and how the console names it
MODE_TOOLS = {"static": ("nncf", "static, NNCF"),
              "dynamic": ("onnxruntime.quantization (dynamic)", "dynamic, ONNX Runtime"),
              "weight-only": ("onnxruntime.quantization (MatMulNBits)", "weight-only, ONNX Runtime")}

#: weight-only INT8: MatMulNBits blocks of this many inputs share a scale (128 ran 1.2x faster
#: than 32 on SmolLM2-135M, at 1.035x against 1.009x its perplexity)
WEIGHT_ONLY_BLOCK = 128


def fold_weight_transposes(model: Any) -> int:
    """Each Transpose of an initializer that feeds a MatMul becomes a transposed initializer, so a
    quantiser sees the weight as a constant: a tied LM head reads the embedding through one (a fifth
    of SmolLM2-135M's products). Returns how many were folded."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = {name for n in graph.node if n.op_type == "MatMul" for name in n.input}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits or node.output[0] not in readers:
            continue
        weight = numpy_helper.to_array(inits[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        graph.initializer.append(onnx.numpy_helper.from_array(
            np.ascontiguousarray(np.transpose(weight, perm)), node.output[0]))
        graph.node.remove(node)
        folded += 1
    return folded


def nbits_quantizer() -> Any:
    """onnxruntime's MatMulNBits quantiser module, imported without its side effect: at import it
    calls ``logging.basicConfig(level=INFO)``, which gave the root logger a handler, and every INFO
    line of every library (onnxscript's constant folding, onnx_ir's passes, matplotlib) reached the
    user's console for the rest of the compile. Handlers it adds are removed and the level restored."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    return matmul_nbits_quantizer


def quantize_weight_only_onnx(fp32_path: Path, out_path: Path) -> Path:
    """ONNX Runtime weight-only INT8 of the model at ``fp32_path``: every MatMul with a constant
    weight becomes MatMulNBits (8-bit symmetric weights in blocks of ``WEIGHT_ONLY_BLOCK`` inputs,
    accuracy level 4: activations quantised per block at run time); written atomically."""
    import onnx

    nbits = nbits_quantizer()
    model = onnx.load(str(fp32_path))
    fold_weight_transposes(model)
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True, accuracy_level=4,
                                                bits=8)
    quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=config)
    with quiet_logger(logging.getLogger(nbits.__name__)):  # a line per node
        quantizer.process()
    with atomic_path(out_path) as tmp:
        quantizer.model.save_model_to_file(str(tmp), use_external_data_format=Path(fp32_path).stat().st_size > 1_800_000_000)
    return out_path


def weight_only_available() -> bool:
    """Whether this ONNX Runtime writes 8-bit MatMulNBits (its quantiser takes ``bits``)."""
    import inspect

    return "bits" in inspect.signature(nbits_quantizer().DefaultWeightOnlyQuantConfig).parameters


def require_int8_mode(mode: str) -> None:
    """InputError naming ``int8.mode`` when this host cannot write the mode's engines (the compile
    checks it before loading the teacher, and again where it quantises)."""
    if mode == "weight-only" and not weight_only_available():
        import onnxruntime

        raise InputError(f"int8.mode weight-only needs 8-bit MatMulNBits, which onnxruntime {onnxruntime.__version__} "
                         "cannot write: upgrade onnxruntime, or set int8.mode to auto, dynamic or static")


def quantization_modes(onnx_path: Path, mode: str) -> list[str]:
    """The INT8 modes to try, in order, each only where the one before was rejected (too slow or
    unfaithful: at a small batch weight-only can pay where dynamic does not, as on SmolLM2-135M):
    the profile's ``int8.mode``, where ``auto`` reads the graph (dynamic, then weight-only, where
    matrix products outnumber convolutions: transformers; static for conv nets)."""
    require_int8_mode(mode)
    if mode != "auto":
        return [mode]
    import onnx

    ops = [n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    products, convs = sum(op in ("MatMul", "Gemm") for op in ops), ops.count("Conv")
    if products <= convs:
        return ["static"]
    return ["dynamic", "weight-only"] if weight_only_available() else ["dynamic"]


def perplexity_ratio(module: nn.Module, runner: Callable[[Inputs], np.ndarray], inputs: Sequence[Inputs]) -> float | None:
    """The engine's perplexity over PyTorch's, of each input's own next tokens at the positions its
    attention mask keeps, as the fidelity table measures it (NaN where the engine's output is not
    finite); None where the inputs are not token ids giving ``[batch, sequence, vocab]`` logits."""
    from potstill.fidelity import perplexity_ratio as ratio
    from potstill.inputs.data import Batch

    outputs = []
    for args, kwargs in inputs:
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            return None
        ref = torch_reference(module, (args, kwargs))
        if ref.ndim != 3 or ref.shape[:2] != tuple(ids.shape):
            return None
        engine = torch.from_numpy(np.asarray(runner((args, kwargs)), np.float64))
        outputs.append((torch.from_numpy(ref), engine, Batch(tuple(args), dict(kwargs))))
    return ratio(outputs) if outputs else None


def example_macs(module: nn.Module, example: Inputs) -> float:
    """Multiply-accumulates of one forward on ``example`` (torch's FLOP counter, halved). Parameters
    are counted frozen: the counter's module tracker hooks every output that requires grad, and a
    module that returns a parameter itself (DeBERTa's relative embeddings) has no gradient function."""
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = example
    counter = FlopCounterMode(display=False)
    frozen = [p for p in module.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.no_grad(), counter:
            module(*args, **kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return counter.get_total_flops() / 2


def top1_disagreement(module: nn.Module, runner: OrtRunner, inputs: Sequence[Inputs], *,
                      tokens: bool = False) -> float | None:
    """Fraction of samples whose argmax differs from PyTorch's; with ``tokens`` (a language model's
    ``[batch, sequence, vocab]`` logits), of the next-token predictions at the positions the
    attention mask keeps. None for outputs that are neither."""
    differ, total = 0, 0
    for item in inputs:
        ref = torch_reference(module, item)
        if tokens and ref.ndim == 3:
            kept = kept_positions(item, ref.shape)
            keep = np.ones(ref.shape[:2], bool) if kept is None else kept
            differ += int(np.sum((np.argmax(runner(item), axis=-1) != np.argmax(ref, axis=-1))[keep]))
            total += int(keep.sum())
            continue
        if ref.ndim != 2 or ref.shape[1] < 2:
            return None
        got = runner(item)
        differ += int(np.sum(np.argmax(got, axis=1) != np.argmax(ref, axis=1)))
        total += ref.shape[0]
    return differ / total if total else None


@dataclass
class Int8Decision:
    keep: bool
    reasons: list[str]
    fp32_ms: float
    int8_ms: float
    rel: float
    disagreement: float | None
    ppl_ratio: float | None = None


def decide(profile: DeviceProfile, fp32_ms: float, int8_ms: float, rel: float,
           disagreement: float | None, ppl_ratio: float | None = None) -> Int8Decision:
    """Apply the profile's INT8 budget; ``reasons`` lists every failed condition. With a
    ``ppl_ratio`` (a language model on real text), perplexity judges fidelity in place of ``rel``
    and ``disagreement``; NaN fails every bound."""
    opts = profile.int8
    reasons = []
    speedup = fp32_ms / int8_ms if int8_ms > 0 else 0.0
    if opts.require_speedup and (int8_ms >= fp32_ms or speedup < opts.min_speedup):
        reasons.append(f"not faster enough: speed-up {speedup:.2f}x < required {opts.min_speedup:g}x")
    if ppl_ratio is not None:
        if not ppl_ratio <= opts.max_perplexity_ratio:
            reasons.append(f"perplexity {ppl_ratio:.3f}x FP32's > int8.max_perplexity_ratio {opts.max_perplexity_ratio:g}")
    else:
        if not rel <= opts.max_rel_error:
            reasons.append(f"parity: rel {rel:.3g} > int8.max_rel_error {opts.max_rel_error:g}")
        if disagreement is not None and not disagreement <= opts.max_accuracy_drop:
            reasons.append(f"top-1 disagreement {disagreement:.3f} > int8.max_accuracy_drop {opts.max_accuracy_drop:g}")
    return Int8Decision(not reasons, reasons, fp32_ms, int8_ms, rel, disagreement, ppl_ratio)


def lower_int8(
    module: nn.Module,
    args: Sequence[Any],
    profile: DeviceProfile,
    out_dir: str | Path,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    calib: Any = None,
    hf: dict[str, Any] | None = None,
    budget_s: float = 1.0,
) -> Artifact:
    """FP32 engine, then NNCF INT8; returns the INT8 artifact if it is kept, else the FP32 one."""
    out_dir = Path(out_dir)
    fp32 = lower_onnxruntime(module, args, profile, out_dir, kwargs=kwargs, dynamic_batch=dynamic_batch, hf=hf,
                             budget_s=budget_s)
    example = fixed_batch(args, kwargs or {}, profile.batch)
    if profile.int8.min_macs:
        macs = example_macs(module, example)
        if macs < profile.int8.min_macs:
            fp32.notes.append(f"kept FP32, INT8 not tried: {macs / 1e6:.3g}M MACs on the example is under the "
                              f"profile's int8.min_macs {profile.int8.min_macs / 1e6:g}M, where quantisation "
                              "overhead outweighs the integer products")  # fmt: skip
            return fp32
    calib_inputs, calib_note = calibration_inputs(calib, example, profile.int8.calibration_samples)
    session, _ = make_session(fp32.files["onnx"], profile)
    exported = OnnxExport(fp32.files["onnx"], flat_spec(module, *example), "",
                          output_name=session.get_outputs()[0].name)
    fp32_runner = OrtRunner(session, exported)
    # judge INT8 on the data distribution it will see: the example plus the calibration batches when
    # there are real ones (random look-alikes, e.g. random token ids, exaggerate INT8 error), else random
    held_out = [example, *calib_inputs[:8]] if calib is not None else held_out_inputs(*example, n_random=6, seed=7)
    lm = (hf or {}).get("task") == "text-generation"
    rejected: list[str] = []
    #: the fastest rejected mode: its own median and its speed-up timed interleaved with FP32
    fastest: tuple[float, float] | None = None
    modes = quantization_modes(fp32.files["onnx"], profile.int8.mode)
    if modes == ["dynamic"] and profile.int8.mode == "auto":
        import onnxruntime

        fp32.notes.append(f"weight-only INT8 not tried: onnxruntime {onnxruntime.__version__} cannot write 8-bit "
                          "MatMulNBits")  # fmt: skip
    int8_path = out_dir / "model.int8.onnx"
    judge = calib_note.replace(" from the calibration data", "") + " judge it"
    # INT8 is judged on rel alone: the largest finite bound stands for "no bound on max_abs"
    budget = Tolerance(max_abs=sys.float_info.max, rel=profile.int8.max_rel_error)
    run_fp32 = partial(session.run, [exported.output_name], fp32_runner.feeds(example))

    def open_runner(path: Path, tool: str = "") -> OrtRunner:
        return OrtRunner(make_session(path, profile)[0], OnnxExport(path, exported.spec, tool,
                                                                     output_name=exported.output_name))

    seven = f"; {SEVEN_BITS}" if products_saturate() else ""  # dynamic and static (weight-only keeps 8)
    for mode in modes:
        if mode == "dynamic":
            quantize_dynamic_onnx(fp32.files["onnx"], int8_path)
            note = f"dynamic activation scales ({judge}){seven}"
            if calib is None:
                note += "; SmoothQuant not tried: no calibration data to scale by"
            else:  # scales from the batches past those that judge INT8, where there are any
                note += "; " + smooth_if_better(
                    module, fp32.files["onnx"], int8_path, [fp32_runner.feeds(i) for i in calib_inputs[8:] or calib_inputs],
                    open_runner, held_out, calib_inputs[:8] if lm else [], profile)
        elif mode == "weight-only":
            quantize_weight_only_onnx(fp32.files["onnx"], int8_path)
            note = f"weight-only, activations quantised per block at run time ({judge})"
        else:
            feeds = [fp32_runner.feeds(item) for item in calib_inputs]
            quantize_onnx(fp32.files["onnx"], int8_path, feeds, profile.int8.calibration_samples,
                          transformer=bool(kwargs) or bool(hf))
            note = calib_note + seven
        runner = open_runner(int8_path, MODE_TOOLS[mode][0])
        int8_session = runner.session
        parity = check_parity(module, runner, held_out, budget)
        disagreement = top1_disagreement(module, runner, held_out, tokens=lm)
        # a language model on real text: perplexity of that text judges it (None on random tokens)
        ppl = perplexity_ratio(module, runner, calib_inputs[:8]) if lm and calib is not None else None
        if ppl is not None:
            parity["ppl_ratio"] = ppl
        parity["ok"] = parity["rel"] <= profile.int8.max_rel_error if ppl is None else ppl <= profile.int8.max_perplexity_ratio
        run_int8 = partial(int8_session.run, [exported.output_name], runner.feeds(example))
        latency = time_callable(run_int8, budget_s=budget_s)
        # the decision reads FP32 and INT8 timed in alternating rounds, so load that comes and goes
        # between two separate timings cannot decide it (a busy host once measured the same INT8 MiniLM
        # 0.78x one time and 2.76x the next)
        reading = TeacherClock(run_fp32).read(run_int8, threshold=profile.int8.min_speedup)
        d = decide(profile, reading.teacher_ms, reading.teacher_ms / reading.speedup, parity["rel"], disagreement, ppl)
        summary = (f"INT8 ({MODE_TOOLS[mode][1]}) {d.int8_ms:.3f} ms vs FP32 {d.fp32_ms:.3f} ms "
                   f"(speed-up {d.fp32_ms / d.int8_ms:.2f}x), rel {d.rel:.3g}"
                   + (f", top-1 disagreement {d.disagreement:.3f}" if d.disagreement is not None else "")
                   + (f", perplexity {d.ppl_ratio:.3f}x FP32's" if d.ppl_ratio is not None else "")
                   + f"; {note}")
        if d.keep:
            art = Artifact("onnxruntime", "int8", {"onnx": int8_path, "onnx_fp32": fp32.files["onnx"]},
                           parity, latency, [*fp32.notes, *rejected, f"kept INT8: {summary}"])
            art.parity["fp32"] = dict(fp32.parity)
            art.latency_ms["fp32_median"] = fp32.latency_ms["median"]
            return art
        rejected.append(f"INT8 rejected ({'; '.join(d.reasons)}): {summary}")
        if fastest is None or reading.speedup > fastest[1]:
            fastest = (latency["median"], reading.speedup)
    int8_path.unlink(missing_ok=True)
    fp32.notes += [*rejected[:-1], f"kept FP32, {rejected[-1]}"]
    fp32.parity["int8"] = dict(parity)
    if fastest is not None:
        fp32.latency_ms["int8_median"], fp32.latency_ms["int8_speedup"] = fastest
    return fp32
