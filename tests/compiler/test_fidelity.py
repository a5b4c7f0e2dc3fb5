"""Fidelity measures against hand-computed values, the held-out split, and broken students."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from potstill.errors import InputError
from potstill.fidelity import (
    Fidelity,
    infer_task,
    measure_fidelity,
    split_heldout,
    split_source,
    student_fidelity,
)
from potstill.inputs.data import Batch
from torch import nn


class Fixed(nn.Module):
    """Returns a fixed output per batch index (read from the input's first value)."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs[int(x.reshape(-1)[0])]


class FixedDict(nn.Module):
    def __init__(self, outputs: list[torch.Tensor], key: str) -> None:
        super().__init__()
        self.outputs, self.key = outputs, key

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.key: self.outputs[int(input_ids[0, 0])]}


def _index_batches(n: int, rows: int = 2) -> list[torch.Tensor]:
    return [torch.full((rows, 1), float(i)) for i in range(n)]


def test_classification_agreement_and_kl_by_hand():
    t = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0], [1.0, 1.0]])]
    s = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 3.0], [0.0, 2.0]])]
    fid = measure_fidelity(Fixed(t), Fixed(s), _index_batches(2))
    assert fid.task == "classification" and fid.n == 4
    # argmax t: 0, 1, 1, 0 (tie -> first); argmax s: 0, 0, 1, 1 -> 2 of 4 agree
    assert fid.measures["top1_agreement"] == pytest.approx(0.5)
    assert fid.score == pytest.approx(0.5)
    kl = 0.0
    for tb, sb in zip(t, s):
        for tr, sr in zip(tb, sb):
            p, q = torch.softmax(tr.double(), 0), torch.softmax(sr.double(), 0)
            kl += float((p * (p.log() - q.log())).sum())
    assert fid.measures["kl"] == pytest.approx(kl / 4, rel=1e-9)


def test_classification_accuracy_when_labels_are_given():
    t = [torch.tensor([[2.0, 0.0], [0.0, 1.0]])]
    s = [torch.tensor([[2.0, 0.0], [2.0, 0.0]])]
    batch = Batch((torch.zeros(2, 1),), target=torch.tensor([0, 0]))
    fid = measure_fidelity(Fixed(t), Fixed(s), [batch])
    assert fid.measures["teacher_accuracy"] == pytest.approx(0.5)
    assert fid.measures["student_accuracy"] == pytest.approx(1.0)
    assert fid.score == pytest.approx(0.5)


def test_embedding_masked_mean_cosine_and_neighbours():
    # hidden states [B=3, T=2, H=2]; the second token of sample 0 is padding
    t_h = torch.tensor([[[1.0, 0.0], [9.0, 9.0]], [[0.0, 1.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 0.9]]])
    s_h = torch.tensor([[[1.0, 0.1], [-5.0, 3.0]], [[0.0, 2.0], [0.0, 2.0]], [[0.2, 1.0], [0.2, 1.0]]])
    mask = torch.tensor([[1, 0], [1, 1], [1, 1]])
    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long), "attention_mask": mask}
    fid = measure_fidelity(
        FixedDict([t_h], "last_hidden_state"), FixedDict([s_h], "last_hidden_state"), [batch]
    )
    assert fid.task == "embedding" and fid.n == 3
    te = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.95]], dtype=torch.float64)
    se = torch.tensor([[1.0, 0.1], [0.0, 2.0], [0.2, 1.0]], dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(te, se, dim=-1).mean()
    assert fid.score == pytest.approx(float(cos), rel=1e-6)
    # teacher neighbours: 0->2, 1->2, 2->0; student: 0->2, 1->2, 2->1
    assert fid.measures["nn_agreement"] == pytest.approx(2 / 3)


class WithExtras(nn.Module):
    """A Hugging Face-like output: the tensor fidelity reads plus others it does not (a cache)."""

    def __init__(self, key: str, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.key, self.proj = key, nn.Linear(4, 4)
        nn.init.normal_(self.proj.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.proj(torch.nn.functional.one_hot(input_ids, 4).float())  # [B, T, 4]
        read = {"last_hidden_state": h, "sentence_embedding": h.mean(1), "logits": h[:, -1]}[self.key]
        return {self.key: read, "past_key_values": h * 7.0}


@pytest.mark.parametrize("key", ["last_hidden_state", "sentence_embedding", "logits"])
def test_cached_teacher_outputs_measure_what_the_teacher_does(key: str) -> None:
    """``reference_output`` keeps what ``measure_fidelity`` reads and nothing else: the cached
    outputs, with their task, give the very fidelity the teacher module gives."""
    from potstill.fidelity import reference_output

    teacher, student = WithExtras(key, 0), WithExtras(key, 1)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 4, (3, 5), generator=g),
                "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])} for _ in range(2)]
    direct = measure_fidelity(teacher, student, batches)
    outs = [teacher(**b) for b in batches]
    refs = [reference_output(o) for o in outs]
    assert all("past_key_values" not in r for r in refs if isinstance(r, dict))
    cached = measure_fidelity(refs, student, batches, infer_task(teacher, None, outs[0]))
    assert cached.task == direct.task == ("classification" if key == "logits" else "embedding")
    assert cached.score == pytest.approx(direct.score, rel=1e-12) and cached.measures == direct.measures
    assert direct.score < 0.999  # the two models differ: the comparison is not trivially equal


def test_causal_lm_agreement_and_perplexity_ratio_by_hand():
    v = 3
    t = torch.log_softmax(torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]]), -1)
    s = torch.log_softmax(torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0]]]), -1)
    ids = torch.tensor([[0, 1, 2]])
    teacher, student = FixedDict([t], "logits"), FixedDict([s], "logits")
    teacher.config = type("C", (), {"architectures": ["TinyForCausalLM"]})()  # type: ignore[assignment]
    batch = {"input_ids": ids, "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    fid = measure_fidelity(teacher, student, [batch])
    assert fid.task == "causal_lm" and fid.n == 3
    assert fid.measures["next_token_agreement"] == pytest.approx(2 / 3)
    # position 0 predicts token 1, position 1 predicts token 2
    nll_t = -(t[0, 0, 1] + t[0, 1, 2]) / 2
    nll_s = -(s[0, 0, 1] + s[0, 1, 2]) / 2
    assert fid.measures["ppl_ratio"] == pytest.approx(math.exp(float(nll_s - nll_t)), rel=1e-6)
    assert v == t.shape[-1]


def test_output_relative_error_by_hand():
    t = [torch.tensor([[3.0], [4.0]])]
    s = [torch.tensor([[3.0], [3.0]])]
    fid = measure_fidelity(Fixed(t), Fixed(s), _index_batches(1))
    assert fid.task == "output"
    assert fid.measures["rel_error"] == pytest.approx(1 / 5)
    assert fid.measures["max_abs"] == pytest.approx(1.0)
    assert fid.score == pytest.approx(0.8)


def test_nan_in_the_student_is_a_failure_never_a_number():
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    s = [torch.tensor([[1.0, 0.0]]), torch.tensor([[float("nan"), 1.0]])]
    fid = measure_fidelity(Fixed(t), Fixed(s), _index_batches(2, rows=1))
    assert math.isnan(fid.score)
    assert fid.measures == {"nonfinite": 1.0}
    assert not fid.ok(0.0)
    assert fid.to_dict()["failed"] is True and fid.to_dict()["score"] is None
    assert "NaN" in fid.summary()


def test_identical_student_scores_one_and_zeroed_student_is_flagged():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    batches = [torch.randn(16, 8) for _ in range(3)]
    same = measure_fidelity(teacher, copy.deepcopy(teacher), batches)
    assert same.score == 1.0 and same.measures["kl"] == pytest.approx(0.0, abs=1e-12)
    broken = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in broken.parameters():
            p.zero_()
    fid = measure_fidelity(teacher, broken, batches)
    assert fid.score < 0.5
    assert not fid.ok(0.8)


def test_modes_are_restored_and_results_are_deterministic():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 3)).train()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.mul_(0.5)
    batches = [torch.randn(8, 4) for _ in range(2)]
    a = measure_fidelity(teacher, student, batches)
    b = measure_fidelity(teacher, student, lambda: iter(batches))
    assert a == b
    assert teacher.training and student.training


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        measure_fidelity(nn.Linear(4, 3), nn.Linear(4, 2), [torch.randn(2, 4)])


def test_infer_task():
    assert infer_task(nn.Identity(), {"task": "text-generation"}, None) == "causal_lm"
    assert infer_task(nn.Identity(), {"task": "feature-extraction"}, None) == "embedding"
    assert infer_task(nn.Identity(), {"task": "image-classification"}, None) == "classification"
    assert infer_task(nn.Identity(), None, torch.zeros(2, 10)) == "classification"
    assert infer_task(nn.Identity(), None, torch.zeros(2, 1)) == "output"
    assert infer_task(nn.Identity(), None, torch.zeros(2, 3, 8, 8)) == "output"
    assert infer_task(nn.Identity(), None, {"last_hidden_state": torch.zeros(1, 2, 3)}) == "embedding"


def test_heldout_split_is_disjoint_deterministic_and_spread():
    items = [f"b{i}" for i in range(10)]
    calib, held = split_heldout(items)
    assert (calib, held) == split_heldout(list(items))
    assert set(calib).isdisjoint(held) and sorted(calib + held) == sorted(items)
    assert held == ["b4", "b9"]  # one from each half: a corpus read in order is sampled across it
    c2, h2 = split_heldout(list(range(2)))
    assert (c2, h2) == ([0], [1])


def test_single_batch_is_split_by_rows():
    x, y = torch.arange(8.0).reshape(8, 1), torch.arange(8)
    calib, held = split_heldout([(x, y)])
    (c,), (h,) = calib, held
    assert c.args[0].shape[0] == 6 and h.args[0].shape[0] == 2
    assert set(c.args[0].reshape(-1).tolist()).isdisjoint(h.args[0].reshape(-1).tolist())
    assert h.target.tolist() == [6, 7]


def test_split_source_reads_once_and_refuses_too_little_data():
    calls = []

    def data():
        calls.append(1)
        return iter([torch.full((2, 1), float(i)) for i in range(4)])

    calib, held = split_source(data)
    assert len(calls) == 1
    assert [b.args[0][0, 0].item() for b in calib()] == [0.0, 1.0, 2.0]
    assert [b.args[0][0, 0].item() for b in held()] == [3.0]
    with pytest.raises(InputError, match="one sample"):
        split_heldout([torch.zeros(1, 3)])
    with pytest.raises(InputError, match="no batches"):
        split_heldout([])


def test_fidelity_floor():
    assert Fidelity("classification", 0.9, {}, 10).ok(0.8)
    assert not Fidelity("classification", 0.7, {}, 10).ok(0.8)


def test_student_fidelity_measures_on_the_heldout_split_and_records_it():
    from potstill.state import CompileState, Student

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    state = CompileState(teacher=teacher, example_inputs=(torch.randn(1, 4),))
    student = Student("s", copy.deepcopy(teacher))
    assert student_fidelity(state, student) is None and "fidelity" not in student.metrics
    held = [torch.randn(8, 4) for _ in range(2)]
    state.heldout_data = lambda: iter(held)
    fid = student_fidelity(state, student, "fidelity_before_distill")
    assert fid is not None and fid.task == "classification" and fid.n == 16 and fid.score == 1.0
    assert student.metrics["fidelity_before_distill"] == fid.to_dict()


def test_fidelity_pass_records_a_stage_and_needs_heldout_data():
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.state import CompileState, Student

    teacher = nn.Sequential(nn.Linear(4, 3)).eval()
    state = CompileState(teacher=teacher, example_inputs=(torch.randn(1, 4),))
    state.students.append(Student("s", copy.deepcopy(teacher)))
    with pytest.raises(Exception, match="held-out"):
        PassManager(build_pipeline("fidelity{stage=before_distill}")).run(state)
    state.heldout_data = lambda: iter([torch.randn(4, 4)])
    PassManager(build_pipeline("fidelity{stage=before_distill}")).run(state)
    assert state.students[0].metrics["fidelity_before_distill"]["score"] == 1.0
    with pytest.raises(InputError):
        build_pipeline("fidelity")  # the stage is required: the manifest key must say what was measured


def test_fidelity_floor_reads_the_profile():
    from potstill.fidelity import DEFAULT_MIN_FIDELITY, fidelity_floor
    from potstill.profiles import load_profile

    profile = load_profile("cpu")
    assert fidelity_floor(profile) == DEFAULT_MIN_FIDELITY
    assert fidelity_floor(profile.model_copy(update={"min_fidelity": 0.9})) == 0.9
