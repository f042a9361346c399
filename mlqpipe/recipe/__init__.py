"""Recipes: YAML files that say which weights of which models get which quantization stages."""

from mlqpipe.recipe.load import check_recipe_collisions, load_recipe
from mlqpipe.recipe.types import Recipe

__all__ = ["load_recipe", "check_recipe_collisions", "Recipe"]
