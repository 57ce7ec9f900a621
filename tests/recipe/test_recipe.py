"""Recipe errors name the file, the key path, the bad value and what is accepted."""

from pathlib import Path

import pytest

from torchkiln.errors import RecipeError
from torchkiln.recipe import apply_overrides, load_recipe, parse_override, validate_recipe

ROOT = Path(__file__).resolve().parents[2]
BASE = '[model]\nname = "mlp"\n[data]\nname = "digits"\n'


def write(tmp_path, text, name="r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name


def test_unknown_key_suggests_and_lists_allowed(tmp_path):
    path = write(tmp_path, BASE + "[train]\nlearning_rate = 0.1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and "train.learning_rate: unknown key" in msg
    assert "allowed keys here:" in msg and "lr" in msg


def test_typo_gets_a_did_you_mean(tmp_path):
    with pytest.raises(RecipeError, match="train.precison: unknown key \\(did you mean 'precision'\\?\\)"):
        load_recipe(write(tmp_path, BASE + '[train]\nprecison = "bf16"\n'))


def test_wrong_type_and_out_of_range_and_bad_choice(tmp_path):
    path = write(tmp_path, BASE + '[train]\nlr = "fast"\naccumulate = 0\nprecision = "fp8"\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "train.lr: got 'fast'; input should be a valid number" in msg
    assert "train.accumulate: got 0; input should be greater than or equal to 1" in msg
    assert "train.precision: got 'fp8'; input should be 'fp32', 'bf16' or 'fp16'" in msg


def test_nested_section_errors(tmp_path):
    path = write(
        tmp_path,
        BASE + '[train]\nschedule = { name = "cosine_restarts", t_mult = 0 }\n'
        'optimizer = { name = "adamw", nesterov = true }\n',
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "train.schedule.t_mult: got 0" in msg
    assert "nesterov=true needs name='sgd' and momentum > 0" in msg


def test_missing_section_and_bad_toml(tmp_path):
    with pytest.raises(RecipeError, match="data: required key is missing"):
        load_recipe(write(tmp_path, '[model]\nname = "mlp"\n'))
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[model\nname = 1\n", "bad.toml"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_unknown_model_and_bad_model_args_fail_before_work(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, '[model]\nname = "resnet-tiiny"\n[data]\nname = "digits"\n'))
    assert "model:" in str(err.value) and "resnet-tiny" in str(err.value)
    with pytest.raises(RecipeError, match="model: .*unknown argument 'hiden'.*did you mean 'hidden'"):
        load_recipe(write(tmp_path, BASE.replace('name = "mlp"', 'name = "mlp"\nargs = { hiden = [8] }')))


def test_user_model_reference_errors_are_reported(tmp_path):
    with pytest.raises(Exception, match="nope.py"):
        load_recipe(write(tmp_path, '[model]\nname = "nope.py:make"\n[data]\nname = "digits"\n'))


def test_overrides():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("train.compile=true") == (["train", "compile"], True)
    assert parse_override("model.args.hidden=[32, 32]") == (["model", "args", "hidden"], [32, 32])
    assert parse_override("data.name=digits") == (["data", "name"], "digits")
    raw = {"model": {"name": "mlp"}, "data": {"name": "digits"}}
    out = apply_overrides(raw, ["train.schedule.name=cosine", "train.lr=0.5"])
    assert out["train"] == {"schedule": {"name": "cosine"}, "lr": 0.5} and "train" not in raw
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_override("train.lr")
    with pytest.raises(RecipeError, match="'name' is a value, not a section"):
        apply_overrides(raw, ["model.name.x=1"])


def test_override_errors_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match="train.lr: got -0.1"):
        load_recipe(write(tmp_path, BASE), ["train.lr=-0.1"])


def test_short_forms():
    r = validate_recipe(
        {
            "model": {"name": "mlp"},
            "data": {"name": "digits"},
            "train": {"compile": True, "ema": False, "schedule": "cosine", "optimizer": "sgd"},
        }
    )
    assert r.train.compile.mode == "default" and r.train.ema is None
    assert r.train.schedule.name == "cosine" and r.train.optimizer.name == "sgd"
