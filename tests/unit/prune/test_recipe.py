"""Recipe loading and validation: every bad recipe is a one-line error naming file, key and line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from shrink.cli import app
from shrink.errors import BadInputError
from shrink.prune.recipe import builtin_recipes, load_recipe

runner = CliRunner()


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_builtin_recipes_load_with_defaults_filled():
    assert "heads-a-star" in builtin_recipes()
    recipe = load_recipe("heads-a-star")
    assert recipe.steps[0].method == "heads.a_star"
    assert recipe.steps[0].target["heads_fraction"] == 0.5
    assert recipe.steps[0].options["masks_per_pass"] == 8  # a default the file does not state


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(BadInputError, match="unknown recipe") as info:
        load_recipe("heads-astar")
    assert "heads-a-star" in info.value.hint


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: x\nsteps:\n  - method: heads.a_star\n    target: {heads_fraction: 0.5\n")
    with pytest.raises(BadInputError, match=r"r\.yaml:\d+: malformed YAML"):
        load_recipe(path)


def test_unknown_method(tmp_path):
    path = write(tmp_path, "name: x\nsteps:\n  - method: heads.a_stra\n")
    with pytest.raises(BadInputError, match="unknown method 'heads.a_stra'") as info:
        load_recipe(path)
    assert "heads.a_star" in info.value.hint


def test_unknown_key_names_key_and_line(tmp_path):
    path = write(tmp_path, "name: x\nsteps:\n  - method: heads.a_star\n    target: {heads_fraction: 0.5}\n    options:\n      beam_width: 3\n")
    with pytest.raises(BadInputError, match=r"r\.yaml:6: steps\.0\.options\.beam_width: unknown key"):
        load_recipe(path)


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "name: x\nstepz: []\nsteps:\n  - method: distill\n")
    with pytest.raises(BadInputError, match=r"r\.yaml:2: stepz: unknown key"):
        load_recipe(path)


def test_wrong_option_type(tmp_path):
    path = write(tmp_path, "name: x\nsteps:\n  - method: heads.a_star\n    target: {heads_fraction: 0.5}\n    options: {branching: many}\n")
    with pytest.raises(BadInputError, match=r"r\.yaml:5: steps\.0\.options\.branching: .*integer"):
        load_recipe(path)


def test_target_out_of_range(tmp_path):
    path = write(tmp_path, "name: x\nsteps:\n  - method: heads.a_star\n    target: {heads_fraction: 1.2}\n")
    with pytest.raises(BadInputError, match=r"steps\.0\.target\.heads_fraction: .*less than or equal to 1"):
        load_recipe(path)


def test_overrides(tmp_path):
    recipe = load_recipe("heads-a-star", ["steps.0.target.heads_fraction=0.25", "steps.1.options.epochs=2"])
    assert recipe.steps[0].target["heads_fraction"] == 0.25 and recipe.steps[1].options["epochs"] == 2
    with pytest.raises(BadInputError, match="heads_fraction: .*less than or equal to 1"):
        load_recipe("heads-a-star", ["steps.0.target.heads_fraction=1.5"])
    with pytest.raises(BadInputError, match="KEY=VALUE"):
        load_recipe("heads-a-star", ["steps.0.target"])


def test_cli_recipes_show_and_errors():
    result = runner.invoke(app, ["recipes", "heads-a-star", "--json"])
    assert result.exit_code == 0
    fields = json.loads(result.stdout)["steps"][0]["fields"]
    assert fields["options.masks_per_pass"]["default"] == 8
    assert fields["target.heads_fraction"]["value"] == 0.5
    result = runner.invoke(app, ["recipes", "nope-nothing"])
    assert result.exit_code == 2 and "unknown recipe" in result.stderr


def test_third_party_methods_register_through_entry_points(monkeypatch, tmp_path):
    import sys
    from importlib import metadata

    from shrink import registry

    (tmp_path / "my_plugin.py").write_text(
        "from shrink.methods.base import NoTarget, StepResult, register\n"
        "@register('plugin.noop', options=NoTarget)\n"
        "def noop(ctx, target, options):\n    'Do nothing.'\n    return StepResult()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    point = metadata.EntryPoint(name="noop", value="my_plugin", group="shrink.methods")
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [point] if group == "shrink.methods" else [])
    from shrink.methods import catalog

    monkeypatch.setattr(catalog, "_discovered", False)
    try:
        assert registry.get_method("plugin.noop").description == "Do nothing."
    finally:
        registry.METHODS.pop("plugin.noop", None)
        sys.modules.pop("my_plugin", None)


def test_overrides_with_several_recipes_name_their_recipe(tmp_path):
    from shrink.prune.pipeline import load_recipes

    other = write(tmp_path, "name: other\nsteps:\n  - method: distill\n", name="other.yaml")
    recipes = load_recipes(["heads-a-star", other], ["other.steps.0.options.epochs=3", "heads-a-star.steps.0.options.branching=2"])
    assert recipes[1].steps[0].options["epochs"] == 3 and recipes[0].steps[0].options["branching"] == 2
    with pytest.raises(BadInputError, match="start the key with a recipe name"):
        load_recipes(["heads-a-star", other], ["steps.0.options.epochs=3"])
