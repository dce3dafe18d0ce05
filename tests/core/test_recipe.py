import importlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from core.errors import UserError
from core.recipe import load_recipe


@dataclass
class Train:
    steps: int = 10
    lr: float = 1e-3
    precision: Literal["no", "bf16", "fp16"] = "no"
    tracker: str = "none"
    compile: bool = False


@dataclass
class Recipe:
    shards: list[str] = field(default_factory=list)
    train: Train = field(default_factory=Train)
    resume: str | None = None


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_fill_nested_dataclasses(tmp_path):
    path = write(tmp_path, "shards: data/train\ntrain:\n  steps: 5\n")
    recipe = load_recipe(path, ["train.lr=3e-4", "train.precision=bf16", "resume=auto"], Recipe)
    assert recipe.shards == ["data/train"]
    assert recipe.train == Train(steps=5, lr=3e-4, precision="bf16")
    assert recipe.resume == "auto"


def test_no_and_off_stay_words_while_true_and_false_are_booleans(tmp_path):
    path = write(tmp_path, "train:\n  precision: no\n  compile: true\n")
    recipe = load_recipe(path, ["train.tracker=off"], Recipe)
    assert (recipe.train.precision, recipe.train.tracker, recipe.train.compile) == ("no", "off", True)
    assert load_recipe(path, ["train.precision=bf16", "train.compile=False"], Recipe).train.compile is False


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("train:\n  stepz: 5\n", [], "unknown key 'train.stepz'"),
        ("", ["train.steps=many"], "'train.steps' must be int"),
        ("", ["train.precision=fp8"], "must be one of no, bf16, fp16"),
        ("", ["train.compile=yes"], "'train.compile' must be bool; got 'yes'"),
        ("train: 3\n", [], "'train' is a section"),
        ("train: [\n", [], "is not valid YAML"),
        ("", ["steps"], "not of the form key=value"),
    ],
)
def test_mistakes_name_the_key_and_the_file(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=message) as error:
        load_recipe(path, overrides, Recipe)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("command, recipe, schema", [
    ("finetune", "recipes/finetune/cpu-synth.yaml", "finetune.train:FinetuneRecipe"),
    ("pretrain", "recipes/pretrain/mae-tiny-synth.yaml", "pretrain.train:PretrainRecipe"),
])
def test_print_recipe_shows_the_effective_recipe_and_it_loads_back(command, recipe, schema, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", command, recipe, "train.steps=7", "data.clip_seconds=2.5",
                             "--print-recipe"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["steps"] == 7 and printed["data"]["clip_seconds"] == 2.5
    assert printed["train"]["grad_accum"] == 1 and "views" in printed["data"]  # defaults filled in
    module, name = schema.split(":")
    cls = getattr(importlib.import_module(module), name)
    (tmp_path / "effective.yaml").write_text(result.stdout)
    assert load_recipe(tmp_path / "effective.yaml", [], cls) == load_recipe(recipe, ["train.steps=7",
                                                                                     "data.clip_seconds=2.5"], cls)


FINETUNE_RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "finetune").glob("*.yaml"))


@pytest.mark.parametrize("path", FINETUNE_RECIPES, ids=lambda p: p.name)
def test_every_shipped_finetune_recipe_loads_under_its_schema(path: Path) -> None:  # pretraining's: test_trainer
    from finetune.train import FinetuneRecipe

    recipe = load_recipe(path, [], FinetuneRecipe)
    assert recipe.output_dir and recipe.data.train and recipe.data.val, path
