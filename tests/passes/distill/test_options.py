"""Strict distill options: one word (method) for the objective, per-method schemas, checked ranges.

Each case was accepted and then ignored (or silently changed the run) before; now it raises an
InputError that names the option and the fix.
"""

from __future__ import annotations

import pytest
from potstill.errors import InputError
from potstill.passes.distill.methods import ARDOptions, KDOptions, option_names
from potstill.passes.distill.pass_ import DistillPass
from potstill.pipeline import build_pipeline

BAD = [
    # the old second vocabulary
    ("distill{loss=rslad}", r"no 'loss' option.*write distill\{method=rslad\}"),
    ("distill{method=ard,loss=hidden}", r"no 'loss' option.*drop loss=hidden"),
    ("distill{loss=nope}", r"no 'loss' option.*methods: kd, hidden"),
    # options of another method
    (
        "distill{eps=0.1}",
        r"\['eps'\] do not apply.*eps belongs to ard, rslad.*method kd takes: alpha, temperature",
    ),
    (
        "distill{method=cema,alpha=0.5}",
        r"\['alpha'\] do not apply.*method cema takes: entropy_fraction, temperature",
    ),
    ("distill{method=ard,k=0.3}", r"\['k'\] do not apply.*k belongs to adaspec"),
    ("distill{method=hidden,temperature=2}", r"method hidden takes: project"),
    ("distill{method=ard,clamp=false,input_min=-1}", r"input_min only apply with clamp=true"),
    # methods
    ("distill{method=nope}", r"unknown method 'nope'"),
    ("distill{method=ard+kd}", r"ard has its own training regime and does not combine"),
    ("distill{method=kd+kd}", r"names a loss twice"),
    # ranges and types
    ("distill{epochs=0}", r"epochs must be >= 1"),
    ("distill{epochs=-3}", r"epochs must be >= 1"),
    ("distill{lr=0}", r"lr must be > 0"),
    ("distill{lr=-1e-3}", r"lr must be > 0"),
    ("distill{lr=.inf}", r"'lr' must be a finite number"),
    ("distill{lr=.nan}", r"'lr' must be a finite number"),
    ("distill{lr=fast}", r"option 'lr' must be float"),
    ("distill{max_steps=0}", r"max_steps must be >= 1"),
    ("distill{batch_size=0}", r"batch_size must be >= 1"),
    ("distill{grad_clip=0}", r"grad_clip must be > 0 \(or null"),
    ("distill{precision=fp8}", r"precision must be fp32, bf16 or fp16"),
    ("distill{optimizer=adam}", r"optimizer must be adamw or sgd"),
    ("distill{temperature=0}", r"temperature must be > 0"),
    ("distill{alpha=1.5}", r"alpha must be in \[0, 1\]"),
    ("distill{method=rslad,eps=0}", r"eps must be > 0"),
    ("distill{method=rslad,pgd_steps=0}", r"pgd_steps must be >= 1"),
    ("distill{method=adaspec,k=2}", r"k must be in \(0, 1\]"),
    ("distill{method=cema,entropy_fraction=0}", r"entropy_fraction must be in \(0, 1\]"),
    ("distill{divergence_factor=0.5}", r"divergence_factor must be > 1"),
    ("distill{epochs=2.5}", r"option 'epochs' must be int"),
    ("distill{parallel=zero}", r"parallel must be one of auto, ddp, fsdp, got 'zero'"),
    # FSDP (or DDP) asked for in one process: an error before any work, naming torchrun
    ("distill{parallel=fsdp}", r"parallel=fsdp needs several processes under torchrun.*parallel=auto"),
    ("distill{parallel=ddp}", r"parallel=ddp needs several processes under torchrun"),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=[b[0] for b in BAD])
def test_ignored_or_bad_distill_option_raises(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_pipeline(spec)


def test_valid_specs_build_and_record_only_what_was_given() -> None:
    (p,) = build_pipeline("distill{method=kd+hidden,temperature=2,project=false,epochs=2}")
    assert p.spec() == "distill{method=kd+hidden,epochs=2,temperature=2.0,project=False}"
    built = p.options.method_options()
    assert built["kd"] == KDOptions(temperature=2.0) and built["hidden"].project is False
    (ard,) = build_pipeline("distill{method=ard,eps=0.05,input_min=-1,input_max=1}")
    assert ard.options.method_options()["ard"].bounds == (-1.0, 1.0)
    assert ard.options.method_options()["ard"] == ARDOptions(eps=0.05, input_min=-1.0, input_max=1.0)
    (nulls,) = build_pipeline("distill{grad_clip=null,divergence_factor=null,max_steps=3}")
    assert nulls.options.grad_clip is None and nulls.options.max_steps == 3


def test_every_method_lists_its_own_options() -> None:
    assert option_names("kd") == ["temperature", "alpha"]
    assert set(option_names("rslad")) == {
        "eps",
        "pgd_steps",
        "eval_pgd_steps",
        "clamp",
        "input_min",
        "input_max",
        "adv_weight",
    }
    assert option_names("kd+cosine") == ["temperature", "alpha", "pooling", "mse_weight"]


def test_checkpoint_options_need_a_work_folder(teacher_data) -> None:
    from potstill.passes.distill import TensorBatches
    from potstill.state import CompileState

    teacher, x, y = teacher_data
    state = CompileState(teacher, (x[:2],), train_data=TensorBatches(x[:64], y[:64], batch_size=32))
    with pytest.raises(InputError, match=r"checkpoint_every given, but this compile has no work folder"):
        DistillPass(checkpoint_every=2, progress=False)(state)
    with pytest.raises(InputError, match=r"resume given, but this compile has no work folder"):
        DistillPass(resume=True, progress=False)(state)
    with pytest.raises(InputError, match=r"eval_limit given, but there is no evaluation data"):
        DistillPass(eval_limit=10, progress=False)(state)


@pytest.mark.parametrize(("value", "message"), [("fsdp", r"parallel=fsdp needs several processes under torchrun"),
                                                 ("fspd", r"parallel must be one of auto, ddp, fsdp")])  # fmt: skip
def test_recipe_train_reaches_parallel(tmp_path, value: str, message: str) -> None:
    from potstill.plan import CompileOptions, apply_recipe, plan_students

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\npipeline: distill\ntrain: {{parallel: {value}, epochs: 2}}\n")
    opts = apply_recipe(CompileOptions(recipe=str(recipe)))
    with pytest.raises(InputError, match=message):
        plan_students(opts, "onnxruntime")
