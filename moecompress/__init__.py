"""moecompress: compress Mixture-of-Experts language models and measure what was lost.

Public API:
    load(path_or_id)        a stock or moecompress checkpoint, in eval mode
    run(recipe)             run a recipe (dict, YAML path or Recipe) → RunResult
                            (ARCHITECTURE.md calls it compress(); that name is the `moecompress.compress`
                            subpackage, which would shadow the function as soon as it is imported)
    evaluate(model, tok)    lm-eval results for an in-memory model
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, **kwargs):
    from moecompress.compress.checkpoint import load as _load

    return _load(path, **kwargs)


def run(recipe, dry_run: bool = False):
    from pathlib import Path

    from moecompress.recipes.run import run as run_recipe
    from moecompress.recipes.schema import Recipe, load_recipe, parse_recipe

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        raise TypeError("recipe must be a dict, a YAML path or a Recipe")
    return run_recipe(recipe, dry_run=dry_run)


def evaluate(model, tokenizer, **kwargs):
    from moecompress.evals.lmeval import evaluate as _evaluate

    return _evaluate(model, tokenizer, **kwargs)
