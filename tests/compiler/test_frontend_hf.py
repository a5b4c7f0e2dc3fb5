"""Hugging Face loading: no folder code runs without opt-in, bad config.json files are named, and
--sequence-length sets the text teachers' example (timing) shape."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from potstill.errors import InputError
from potstill.inputs.hf_examples import DEFAULT_SEQUENCE_LENGTH
from potstill.inputs.teacher import load_teacher

transformers = pytest.importorskip("transformers")

EVIL = """
from pathlib import Path
Path(__file__).with_name("RAN").write_text("folder code ran")
from transformers import BertConfig as EvilConfig, BertModel as EvilModel
"""


def _bert(tmp_path: Path) -> Path:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    path = tmp_path / "bert"
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def _edit(path: Path, **fields: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


def test_auto_map_never_runs_folder_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _bert(tmp_path)
    (path / "evil.py").write_text(EVIL)
    _edit(path, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("prompted for trust_remote_code"))
    t = load_teacher(f"hf:{path}")  # a known model_type: transformers' own class, no prompt
    assert type(t.module).__name__ == "BertModel" and not (path / "RAN").exists()
    _edit(path, model_type="evil-arch")
    with pytest.raises(InputError, match=r"'model_type' is 'evil-arch'.*--trust-remote-code"):
        load_teacher(f"hf:{path}")
    assert not (path / "RAN").exists()


def test_bad_config_json_is_named(tmp_path: Path) -> None:
    path = _bert(tmp_path)
    (path / "config.json").write_text('{"model_type": "bert", ')
    with pytest.raises(InputError, match=r"config\.json is not valid JSON"):
        load_teacher(f"hf:{path}")
    (path / "config.json").write_text(json.dumps({"hidden_size": 16}))
    with pytest.raises(InputError, match="no 'model_type' field"):
        load_teacher(f"hf:{path}")
    (path / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    with pytest.raises(InputError, match="does not know"):
        load_teacher(f"hf:{path}")
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": "BertModel"}))
    with pytest.raises(InputError, match="'architectures' must be a list"):
        load_teacher(f"hf:{path}")
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 30, "num_attention_heads": 4}))
    with pytest.raises(InputError, match=r"config\.json"):
        load_teacher(f"hf:{path}")


def test_sequence_length_sets_the_example_shape(tmp_path: Path) -> None:
    path = _bert(tmp_path)
    assert load_teacher(f"hf:{path}").example_kwargs["input_ids"].shape == (1, DEFAULT_SEQUENCE_LENGTH)
    t = load_teacher(f"hf:{path}", sequence_length=12)
    assert {k: tuple(v.shape) for k, v in t.example_kwargs.items()} == {
        "input_ids": (1, 12), "attention_mask": (1, 12), "token_type_ids": (1, 12)}
    with pytest.raises(InputError, match="between 1 and 65536"):
        load_teacher(f"hf:{path}", sequence_length=0)
    with pytest.raises(InputError, match="Hugging Face text teachers"):
        load_teacher("x.py:f", sequence_length=8)
    with pytest.raises(InputError, match="Hugging Face teachers"):
        load_teacher("x.py:f", trust_remote_code=True)
    vit = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=16)).save_pretrained(vit)
    with pytest.raises(InputError, match="applies to text models"):
        load_teacher(f"hf:{vit}", sequence_length=8)


@pytest.mark.slow
def test_hf_text_teacher_with_a_tensorrt_profile(tmp_path: Path) -> None:
    """The teacher is timed with its keyword inputs; the bundle's trtexec line spans batch and tokens."""
    from potstill.driver import compile_teacher
    from potstill.plan import CompileOptions

    path = _bert(tmp_path)
    res = compile_teacher(CompileOptions(teacher=f"hf:{path}", out=str(tmp_path / "out"), profile="h100-trt-fp16",
                                         ratios=(0.5,), distill=False), note=lambda _: None)
    assert res.manifest["teacher"]["latency_ms"]["median"] > 0
    student = res.out / res.manifest["students"][0]["dir"]
    build = next(student.rglob("build.sh")).read_text()
    assert re.search(r"--minShapes=input_ids:\d+x1,", build) and re.search(r"--optShapes=input_ids:\d+x32,", build)
    assert re.search(r"--maxShapes=input_ids:\d+x512,", build)  # the profile's max_sequence (BERT allows 512)
