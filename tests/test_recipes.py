"""Every built-in recipe validates against the schema, names registered methods and runs by name."""

import pytest

from moecompress.methods.base import all_methods
from moecompress.recipes.schema import builtin_recipes, load_recipe


@pytest.mark.parametrize("name", builtin_recipes())
def test_builtin_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.stages and all(stage.method in all_methods() for stage in recipe.stages)


def test_every_pruning_method_has_a_builtin_recipe():
    covered = {stage.method for name in builtin_recipes() for stage in load_recipe(name).stages}
    pruning = {n for n, m in all_methods().items() if m.kind.endswith("pruning")}
    assert pruning <= covered
