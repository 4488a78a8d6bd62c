"""What a recipe script (``examples/*.py``) imports: the pieces every recipe uses, in one place.

A recipe declares its presets, its command line (:func:`recipe_parser`) and its arms, then hands
them to :func:`recipe_main`; everything else (data, the epoch loop, checkpoints, resume, the report
and the verdict) is ``recipe_lib``'s.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

from recipe_lib.cli import (
    Presets,
    RecipeSpec,
    apply_preset,
    base_parser,
    check_epochs,
    check_swa_start,
    preset_help,
    run_recipe,
)
from recipe_lib.datasets import ImageDataset
from recipe_lib.engine import Arm, ArmResult, FGESettings, SWASettings
from recipe_lib.verdict import MeasuredSpread

__all__ = [
    "Arm",
    "ArmResult",
    "FGESettings",
    "ImageDataset",
    "MeasuredSpread",
    "RecipeSpec",
    "SWASettings",
    "check_epochs",
    "check_swa_start",
    "parse_recipe_args",
    "recipe_main",
    "recipe_parser",
]


def recipe_parser(doc: str, presets: Presets, name: str) -> tuple[argparse.ArgumentParser, Callable[..., str]]:
    """The shared command line of recipe ``name`` (its first ``doc`` paragraph as the description),
    and the help builder for its preset-controlled options: ``h(key, text)`` says each preset's value."""
    return base_parser(doc.split("\n\n")[0], presets, name), partial(preset_help, presets)


def parse_recipe_args(parser: argparse.ArgumentParser, presets: Presets,
                      argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed, with the chosen preset filling every option not given."""
    return apply_preset(parser.parse_args(argv), presets)


def recipe_main(spec: RecipeSpec, args: argparse.Namespace) -> int:
    """Run the recipe ``spec`` with ``args``; the exit status."""
    run_recipe(spec, args)
    return 0
