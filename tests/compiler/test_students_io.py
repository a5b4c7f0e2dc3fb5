"""The reload contract: ``save_student`` writes safetensors + architecture.json, ``load_student``
rebuilds the teacher's class, removes the recorded blocks, narrows the modules and loads the weights.

Checked on students no Hugging Face config can describe (OPT heads without ``_prune_heads``,
a BERT with different head counts per layer) and on a custom CNN from ``file.py:FACTORY``.
"""

from __future__ import annotations

import json
import os
import random
import textwrap
from pathlib import Path

import potstill
import pytest
import torch
from potstill.errors import InputError
from potstill.inputs.data import primary_output
from potstill.ir.capture import analyze
from potstill.ir.surgery import prune_width, remove_blocks
from potstill.outputs.students_io import RECORD_FILE, WEIGHTS_FILE, load_student, save_student

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _half(a, seed=0, kinds=None):
    rng = random.Random(seed)
    return {g.id: sorted(rng.sample(range(g.n_units), max(1, g.n_units // 2)))
            for g in a.prunable() if kinds is None or g.kind in kinds}


def _same(a, b, kwargs):
    with torch.no_grad():
        torch.testing.assert_close(primary_output(a(**kwargs)), primary_output(b(**kwargs)))


def _saved_teacher(model, tmp_path):
    path = tmp_path / "teacher"
    model.save_pretrained(path)
    return {"spec": f"hf:{path}", "hf": {"path": str(path), "auto_class": "AutoModelForCausalLM"}}


def test_opt_heads_without_prune_heads(tmp_path):
    """OPT has no ``_prune_heads``: heads are sliced, counts set per layer, the record reloads it."""
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 ffn_dim=96, max_position_embeddings=64, word_embed_proj_dim=64, use_cache=False)
    m = transformers.OPTForCausalLM(cfg).eval()
    kw = {"input_ids": torch.randint(0, 100, (2, 9))}
    a = analyze(m, (), kw)
    keep = _half(a, kinds={"heads"})
    first = min(keep)
    keep[first] = keep[first][:1]  # layers keep different head counts: no config can say so
    student = remove_blocks(prune_width(m, a, keep), a, [a.blocks[1].name])
    record = save_student(student, tmp_path / "s", teacher=_saved_teacher(m, tmp_path), example=((), kw))
    assert record["loaders"] == ["potstill.load_student"]
    assert record["removed_blocks"] == {"model.decoder.layers": [1]}
    heads = [v["heads"] for k, v in record["heads"].items()]
    assert heads == [1, 2]
    again = potstill.load_student(tmp_path / "s")
    assert [layer.self_attn.num_heads for layer in again.model.decoder.layers] == [1, 2]
    _same(student, again, kw)
    fresh = {"input_ids": torch.randint(0, 100, (3, 5))}
    _same(student, again, fresh)


def test_bert_uniform_heads_also_loads_with_automodel(tmp_path):
    torch.manual_seed(0)
    m = transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=96, vocab_size=100)).eval()
    kw = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    a = analyze(m, (), kw)
    student = remove_blocks(prune_width(m, a, _half(a)), a, ["encoder.layer.0"])
    path = tmp_path / "bert"
    m.save_pretrained(path)
    record = save_student(student, tmp_path / "s", teacher={"spec": f"hf:{path}", "hf": {"path": str(path)}},
                          example=((), kw))
    assert record["loaders"] == ["potstill.load_student", "transformers.AutoModel"]
    _same(student, transformers.AutoModel.from_pretrained(tmp_path / "s" / "hf"), kw)
    _same(student, load_student(tmp_path / "s"), kw)
    assert (tmp_path / "s" / WEIGHTS_FILE).read_bytes()[:8] != b"\x80\x02\x8a\nl\xfc\x9c"  # safetensors, not pickle


CNN = """
import torch
from torch import nn

def teacher():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
"""


def test_file_factory_cnn(tmp_path):
    src = tmp_path / "cnn.py"
    src.write_text(textwrap.dedent(CNN))
    from potstill.inputs.data import load_callable

    m = load_callable(f"{src}:teacher")().eval()
    x = torch.randn(2, 3, 8, 8)
    a = analyze(m, (x,))
    student = prune_width(m, a, _half(a))
    assert student[0].out_channels < 16
    record = save_student(student, tmp_path / "s", teacher={"spec": f"{src}:teacher"}, example=((x,), {}))
    assert record["teacher"]["kind"] == "factory" and record["loaders"] == ["potstill.load_student"]
    assert record["modules"]["0"]["out_channels"] == student[0].out_channels
    again = load_student(tmp_path / "s", factory=load_callable(f"{src}:teacher"))
    with torch.no_grad():
        torch.testing.assert_close(again(torch.ones(3, 3, 8, 8)), student(torch.ones(3, 3, 8, 8)))
    with pytest.raises(InputError, match=r"names spec .*cnn\.py:teacher.*pass the factory yourself"):
        load_student(tmp_path / "s")  # the recorded spec is never imported
    with pytest.raises(InputError, match=r"teacher\.class is 'torch\.nn\.modules\.container\.Sequential' but "
                                         r"factory= built a torch\.nn\.modules\.linear\.Linear"):
        load_student(tmp_path / "s", factory=lambda: torch.nn.Linear(2, 2))


def test_bad_records_name_the_file_and_field(tmp_path):
    with pytest.raises(InputError, match=r"architecture\.json: no such file"):
        load_student(tmp_path)
    (tmp_path / RECORD_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_student(tmp_path)
    (tmp_path / RECORD_FILE).write_text(json.dumps({"format": "potstill.student", "version": 1}))
    with pytest.raises(InputError, match="missing field 'teacher'"):
        load_student(tmp_path)
    rec = {"format": "potstill.student", "version": 1, "tensors": {}, "modules": {}, "removed_blocks": {},
           "teacher": {"kind": "hf", "class": "transformers.models.bert.modeling_bert.BertModel",
                       "config": {"model_type": "no-such-model"}}}
    (tmp_path / RECORD_FILE).write_text(json.dumps(rec))
    with pytest.raises(InputError, match=r"model\.safetensors: no such file"):
        load_student(tmp_path)
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(InputError, match="no-such-model"):
        load_student(tmp_path)


def test_unused_path_is_not_touched(tmp_path: Path):
    """load_student reads only its folder: nothing is written there."""
    _tiny_bert_student(tmp_path)
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    load_student(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == before


@pytest.mark.slow
def test_llama_student_pt2_with_plain_tensor_mask(tmp_path):
    """transformers' mask code (flat_apply) cannot be serialized; the plain-tensor mask can."""
    from potstill.outputs.students_io import plain_mask_module, save_program

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    kw = {"input_ids": torch.randint(0, 50, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    saved = save_program(m, (), kw, tmp_path / "student.pt2")
    assert saved["file"] == "student.pt2" and "plain tensor ops" in saved["note"]
    program = torch.export.load(str(tmp_path / "student.pt2")).module()
    ids = torch.randint(0, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(program(input_ids=ids, attention_mask=mask)["logits"], m(input_ids=ids, attention_mask=mask).logits)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=16)).eval()
    assert plain_mask_module(bert, kw) is None  # bidirectional: a causal mask would change it


@pytest.mark.slow
def test_llama_from_a_factory_gets_student_pt2_from_positional_ids(tmp_path):
    """A ``file.py:teacher`` factory's example is ``(input_ids,)``, positional: the plain-tensor mask
    applies to it too (before, the program kept flat_apply and student.pt2 was not written)."""
    from potstill.outputs.students_io import plain_mask_module, save_program

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 8))
    saved = save_program(m, (ids,), {}, tmp_path / "student.pt2")
    assert saved["file"] == "student.pt2" and saved["dynamic_batch"] and "plain tensor ops" in saved["note"]
    program = torch.export.load(str(tmp_path / "student.pt2")).module()
    other = torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(program(other)["logits"], m(other).logits)
    assert plain_mask_module(m, {}, (ids.float(),)) is None  # not token ids: no wrapper
    assert plain_mask_module(m, {}, (None, torch.ones(1, 8))) is None  # the ids are not the first argument


# ---------------------------------------------------------------------------------------------
# A student folder is data: tampered records execute nothing


PAYLOAD = """
from pathlib import Path
Path({sentinel!r}).write_text("ran")

def make():
    Path({sentinel!r}).write_text("ran")
    import torch
    return torch.nn.Linear(2, 2)
"""


def _tiny_bert_student(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32, vocab_size=50)).eval()
    path = tmp_path / "t"
    m.save_pretrained(path)
    save_student(m, tmp_path / "s", teacher={"spec": f"hf:{path}", "hf": {"path": str(path)}})
    return tmp_path / "s"


def _tamper(folder: Path, **teacher) -> None:
    rec = json.loads((folder / RECORD_FILE).read_text())
    rec["teacher"].update(teacher)
    (folder / RECORD_FILE).write_text(json.dumps(rec))


def test_tampered_factory_spec_is_never_imported(tmp_path: Path):
    folder = _tiny_bert_student(tmp_path)
    sentinel = tmp_path / "sentinel"
    evil = tmp_path / "elsewhere" / "evil.py"
    evil.parent.mkdir()
    evil.write_text(PAYLOAD.format(sentinel=str(sentinel)))
    _tamper(folder, kind="factory", spec=f"{evil}:make", **{"class": "torch.nn.modules.linear.Linear"})
    with pytest.raises(InputError, match=rf"{RECORD_FILE}: .*record names spec '.*evil\.py:make'.*factory="):
        load_student(folder)
    assert not sentinel.exists()


@pytest.mark.parametrize("path", ["subprocess.Popen", "os.system", "builtins.eval", "transformers.pipeline",
                                  "transformers.models.bert.modeling_bert.BertConfig", "torch.Tensor"])
def test_tampered_class_outside_the_allow_list(tmp_path: Path, path: str):
    folder = _tiny_bert_student(tmp_path)
    _tamper(folder, **{"class": path})
    with pytest.raises(InputError, match=rf"{RECORD_FILE}: teacher.class '{path}'.*model_class=.*factory="):
        load_student(folder)


NOT_IMPORTED = """
import json, sys
from pathlib import Path
from potstill.errors import InputError
from potstill.outputs.students_io import RECORD_FILE, load_student
folder = Path(sys.argv[1])
rec = json.loads((folder / RECORD_FILE).read_text())
out = {}
for path in ("this.s", "antigravity.fly", "xml.dom.minidom.parseString"):
    module = path.rsplit(".", 1)[0]
    before = module in sys.modules
    rec["teacher"]["class"] = path
    (folder / RECORD_FILE).write_text(json.dumps(rec))
    try:
        load_student(folder)
        out[path] = "loaded"
    except InputError as e:
        out[path] = ["InputError", str(e), before, module in sys.modules]
print(json.dumps(out))
"""


def test_tampered_class_of_a_module_not_yet_imported_imports_nothing(tmp_path: Path):
    """``this.s`` would print the Zen on import: the module stays unimported (checked in a fresh
    interpreter, so no other test's imports interfere)."""
    import subprocess
    import sys

    folder = _tiny_bert_student(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", NOT_IMPORTED, str(folder)], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    assert "Beautiful is better than ugly" not in done.stdout
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for path, (kind, message, before, after) in out.items():
        assert kind == "InputError" and f"teacher.class '{path}'" in message
        assert "not imported" in message and "model_class=" in message
        assert before is False and after is False, path


def test_legit_class_from_an_imported_module_or_passed_in(tmp_path: Path):
    """A transformers class by name, an nn.Module class of a module the caller imported, and a class
    passed as model_class resolve; a model_class that is not the recorded one is refused."""
    from potstill.outputs.students_io.teacher import _resolve_class

    assert _resolve_class("torch.nn.modules.linear.Linear") is torch.nn.Linear
    assert _resolve_class("transformers.models.bert.modeling_bert.BertModel") is transformers.BertModel
    folder = _tiny_bert_student(tmp_path)
    kw = {"input_ids": torch.randint(0, 50, (1, 5))}
    _same(load_student(folder), load_student(folder, model_class=transformers.BertModel), kw)
    with pytest.raises(InputError, match="does not match the model_class passed"):
        load_student(folder, model_class=transformers.GPT2Model)


def test_tensor_replaced_by_a_larger_one_is_named(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    folder = _tiny_bert_student(tmp_path)
    saved = load_file(str(folder / WEIGHTS_FILE))
    name = "encoder.layer.0.output.dense.weight"
    saved[name] = torch.zeros(saved[name].shape[0] * 4, saved[name].shape[1])
    save_file(saved, str(folder / WEIGHTS_FILE))
    with pytest.raises(InputError, match=rf"tensor '{name}' is F32\[128, 32\] but {RECORD_FILE} records F32\[32, 32\]"):
        load_student(folder)
    saved[name] = torch.zeros(32, 32, dtype=torch.float64)
    save_file(saved, str(folder / WEIGHTS_FILE))
    with pytest.raises(InputError, match=rf"tensor '{name}' is F64"):
        load_student(folder)
    saved[name] = torch.zeros(32, 32)
    saved["extra.weight"] = torch.zeros(1)
    save_file(saved, str(folder / WEIGHTS_FILE))
    with pytest.raises(InputError, match=r"\['extra.weight'\] are not named"):
        load_student(folder)
    del saved["extra.weight"], saved[name]
    save_file(saved, str(folder / WEIGHTS_FILE))
    with pytest.raises(InputError, match=rf"\['{name}'\] named in {RECORD_FILE} are missing"):
        load_student(folder)


CACHED_CNN = CNN.replace("def teacher():", "import functools\n\n@functools.lru_cache(maxsize=1)\ndef teacher():") + """

def example_inputs():
    return (torch.randn(1, 3, 8, 8),)


def calib_data():
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        yield torch.randn(16, 3, 8, 8, generator=g)
"""


def test_a_factory_that_hands_out_one_instance_keeps_its_teacher(tmp_path: Path) -> None:
    """``functools.lru_cache`` on the factory: saving and reloading a student narrow a copy, never
    the caller's teacher. Narrowing the shared teacher turned it into the student, so the compile
    measured the student against itself (top-1 agreement 1.0, KL 0.0)."""
    from potstill.inputs.data import load_callable

    src = tmp_path / "cached.py"
    src.write_text(textwrap.dedent(CACHED_CNN))
    factory = load_callable(f"{src}:teacher")
    teacher = factory().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    a = analyze(teacher, (x,))
    student = prune_width(teacher, a, _half(a))
    save_student(student, tmp_path / "s", teacher={"spec": f"{src}:teacher"}, example=((x,), {}))
    again = load_student(tmp_path / "s", factory=factory)
    assert factory() is teacher and again is not teacher and again[0].out_channels == student[0].out_channels
    assert teacher[0].out_channels == 16
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())

    result = potstill.compile(f"{src}:teacher", out=tmp_path / "out", ratios=[0.5], distill=False)
    (s,) = result.students
    assert factory() is teacher and teacher[0].out_channels == 16
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert s.fidelity["measures"]["kl"] > 0  # measured against the teacher, not against itself
