from __future__ import annotations

from pathlib import Path

import pytest
from potstill.errors import InputError
from potstill.passes.distill.recipe import build_stages, load_recipe, parse_recipe
from torch import nn

GOOD = """
version: 1
teacher: models.py:teacher
data: {train: data.py:train, eval: data.py:test}
pipeline: "prune.width{ratio=0.5},distill{method=kd,epochs=3}"
stages:
  - {name: general, method: hidden, data: data.py:general, epochs: 1}
  - {name: task, method: hidden+kd, options: {alpha: 0.5}, teacher: models.py:finetuned, lr: 0.001}
"""


def test_good_recipe_loads_and_builds_stages(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(GOOD)
    recipe = load_recipe(path)
    assert recipe.version == 1 and recipe.data.train == "data.py:train"
    assert recipe.pipeline == "prune.width{ratio=0.5},distill{method=kd,epochs=3}"
    made: list[str] = []

    def loader(spec: str):
        made.append(spec)
        return lambda: nn.Linear(1, 1)

    stages = build_stages(recipe, loader)
    assert [s.loss for s in stages] == ["hidden", "hidden+kd"]
    assert stages[0].train == {"epochs": 1} and stages[1].train == {"lr": 0.001}
    assert stages[1].loss_options == {"project": True, "temperature": 1.0, "alpha": 0.5}
    assert isinstance(stages[1].teacher, nn.Linear)
    assert made == ["data.py:general", "models.py:finetuned"]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"stages": [{"name": "a", "method": "kdd"}]}, "stages.0"),
        ({"stages": [{"name": "a", "loss": "kd"}]}, "stages.0.loss"),
        ({"stages": [{"name": "a", "method": "kd", "options": {"eps": 0.1}}]}, "stages.0"),
        ({"stages": [{"name": "a", "epochs": -1}]}, "stages.0.epochs"),
        ({"stages": [{"method": "kd"}]}, "stages.0.name"),
        ({"stages": [{"name": "a", "train": {"lrr": 1}}]}, "stages.0.train"),
        ({"data": {"trian": "x.py:f"}}, "data.trian"),
        ({"pipelin": "distill"}, "pipelin"),
        ({"train": "fast"}, "train"),  # its keys are checked against the distillation pass it feeds
    ],
)
def test_recipe_errors_name_the_field(patch: dict, field: str) -> None:
    with pytest.raises(InputError) as e:
        parse_recipe({"version": 1} | patch, "r.yaml")
    assert f"r.yaml: {field}:" in str(e.value)


def test_recipe_version_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="version: missing"):
        parse_recipe({"stages": []})
    with pytest.raises(InputError, match="version: 2 is not supported"):
        parse_recipe({"version": 2})
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nstages: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"name": "a", "loss": "rslad"}, "'loss' is now 'method'"),
        ({"name": "a", "loss_options": {}}, "'loss_options' is now 'options'"),
        ({"name": "a", "method": "kd", "options": {"eps": 0.1}}, r"\['eps'\] do not apply.*method kd takes"),
        ({"name": "a", "method": "kdd"}, "unknown method 'kdd'"),
    ],
)
def test_stage_uses_the_distill_vocabulary(stage: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_recipe({"version": 1, "stages": [stage]}, "r.yaml")
