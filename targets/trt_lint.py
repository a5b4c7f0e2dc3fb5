"""Lint an ONNX model against TensorRT 10's ONNX parser before it reaches the device.

The tables follow onnx-tensorrt's ``docs/operators.md`` (TensorRT 10.x: opsets 9–20 and later; the
N rows and the restrictions column), plus NVIDIA's DLA layer-support list. Findings name the node
and its op and say why:

* ``error``: the parser rejects it — an op TensorRT does not implement (``Unique``,
  ``ConvInteger``, sequence and string ops, …), a custom-domain op without a plugin, a non-zero
  Q/DQ zero point (TensorRT quantises symmetrically), integer GEMM/Conv, ``TopK`` with a computed K,
  ``MaxPool``'s indices output;
* ``warning``: it builds but may surprise — data-dependent shapes (``NonZero``), DOUBLE tensors cast
  to FP32, convolution weights that are not initializers, an op missing from this table, an opset
  newer than 20, layers that fall back from a DLA to the GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: ONNX ops TensorRT 10's parser implements (onnx-tensorrt docs/operators.md, "Y" rows).
SUPPORTED = frozenset(["Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention", "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RMSNormalization", "RNN", "RoiAlign", "RotaryEmbedding", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor"])

#: ONNX ops TensorRT 10's parser rejects ("N" rows).
UNSUPPORTED = frozenset(["Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow", "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "STFT", "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique"])

#: ops that map to DLA layers (NVIDIA DLA supported layers); others fall back to the GPU.
DLA_OPS = frozenset(["Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "Elu", "Selu", "Softplus", "HardSigmoid", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LRN", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Concat", "Resize", "Upsample", "Softmax", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Abs", "Neg", "QuantizeLinear", "DequantizeLinear", "Identity", "Constant"])

MAX_TESTED_OPSET = 20
_INT_TYPES = {6: "int32", 7: "int64", 3: "int8", 2: "uint8", 5: "int16"}
_DOUBLE = 11


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "info"
    node: str
    op: str
    message: str

    def text(self) -> str:
        return f"{self.severity}: node '{self.node}' ({self.op}): {self.message}"


def lint_onnx(model: Any, dla: bool = False) -> list[Finding]:
    """Findings for ``model`` (an ``onnx.ModelProto`` or a path); errors first."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    types = _value_types(inferred)
    inits = {i.name: i for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    findings: list[Finding] = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_TESTED_OPSET:
            findings.append(Finding("warning", "(model)", "opset", f"opset {opset.version} is newer than "
                                    f"{MAX_TESTED_OPSET}, the newest TensorRT 10.0 parses; use TensorRT >= 10.x "
                                    "that lists it or export with opset_version=20"))
    for i, node in enumerate(model.graph.node):
        findings += _node_findings(node, node.name or f"#{i}", types, inits, consts=consts, dla=dla)
    findings += [Finding("warning", v, "DOUBLE", "DOUBLE tensor: TensorRT casts it to FP32 (clamped)")
                 for v, t in types.items() if t == _DOUBLE]
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.severity])


def _value_types(model: Any) -> dict[str, int]:
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}


def _node_findings(node: Any, name: str, types: dict[str, int], inits: dict[str, Any], *,
                   consts: set[str], dla: bool) -> list[Finding]:
    from onnx import numpy_helper

    op, out = node.op_type, []
    if node.domain not in ("", "ai.onnx"):
        return [Finding("error", name, f"{node.domain}::{op}", "custom-domain op: TensorRT needs a plugin "
                        "registered under this name; export without contrib ops")]
    if op in UNSUPPORTED:
        return [Finding("error", name, op, "not supported by TensorRT's ONNX parser; replace it in the "
                        "model (or provide a plugin)")]
    if op not in SUPPORTED:
        out.append(Finding("warning", name, op, "not in potstill's TensorRT 10 operator table; check "
                           "onnx-tensorrt docs/operators.md for your TensorRT version"))
    if op == "NonZero":
        sev = "error" if dla else "warning"
        out.append(Finding(sev, name, op, "data-dependent output shape: needs an output allocator at run "
                           "time, blocks CUDA graphs and never runs on a DLA"))
    if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in inits:
        zp = numpy_helper.to_array(inits[node.input[2]])
        if zp.size and abs(zp.astype("int64")).max() != 0:
            out.append(Finding("error", name, op, "non-zero zero point: TensorRT quantises symmetrically; "
                               "quantize with a symmetric preset (NNCF PERFORMANCE)"))
    if op in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
        int_inputs = [_INT_TYPES[types[i]] for i in node.input[:2] if types.get(i) in _INT_TYPES]
        if int_inputs:
            out.append(Finding("error", name, op, f"integer {'/'.join(int_inputs)} {op}: TensorRT runs "
                               "GEMM/convolution on float types (INT8 only through Q/DQ)"))
    if op in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] not in set(inits) | consts:
        out.append(Finding("warning", name, op, "weights are computed, not an initializer: slower "
                           "(no weight pre-formatting) and not refittable"))
    if op == "TopK" and len(node.input) > 1 and node.input[1] not in set(inits) | consts:
        out.append(Finding("error", name, op, "K must be an initializer or constant"))
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        out.append(Finding("error", name, op, "the Indices output of MaxPool is not supported"))
    if op == "Resize" and any(a.name == "antialias" and a.i for a in node.attribute):
        out.append(Finding("error", name, op, "antialiased Resize is not supported"))
    if dla and op not in DLA_OPS and op in SUPPORTED and op != "NonZero":  # NonZero: error above
        out.append(Finding("warning", name, op, "no DLA layer for this op: it falls back to the GPU "
                           "(--allowGPUFallback), splitting the engine"))
    return out


def report_markdown(findings: list[Finding], model_name: str = "model.onnx") -> str:
    errors = sum(f.severity == "error" for f in findings)
    warnings_ = sum(f.severity == "warning" for f in findings)
    lines = [f"# TensorRT lint of {model_name}", "",
             f"{errors} error(s), {warnings_} warning(s) against TensorRT 10's ONNX operator support.", ""]
    if findings:
        lines += ["| severity | node | op | finding |", "|---|---|---|---|"]
        lines += [f"| {f.severity} | {f.node} | {f.op} | {f.message} |" for f in findings]
    else:
        lines.append("No findings: every op is in TensorRT 10's supported table.")
    return "\n".join(lines) + "\n"


def findings_to_json(findings: list[Finding]) -> list[dict[str, str]]:
    return [asdict(f) for f in findings]


def lint_path(path: str | Path, dla: bool = False) -> list[Finding]:
    return lint_onnx(Path(path), dla=dla)
