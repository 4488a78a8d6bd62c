"""What a recipe script (``examples/*.py``) imports: the pieces every recipe uses, in one place.

A recipe declares its presets, its command line (:func:`recipe_parser`, numeric options typed with
the ranges of :class:`~recipe_lib.cli.Number`: ``COUNT``, ``RATE``, ...) and its arms, then hands
them to :func:`recipe_main`; everything else (data, the epoch loop, checkpoints, resume, the report
and the verdict) is ``recipe_lib``'s.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

from recipe_lib.cli import (
    COUNT,
    INTEGER,
    MOMENTUM,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    RATE,
    Number,
    Presets,
    RecipeSpec,
    apply_preset,
    base_parser,
    check_distinct,
    check_epochs,
    check_numbers,
    check_swa_start,
    check_warmup,
    check_within_epochs,
    preset_help,
    run_recipe,
)
from recipe_lib.datasets import ImageDataset
from recipe_lib.engine import Arm, ArmResult, FGESettings, SWASettings
from recipe_lib.verdict import MeasuredSpread

__all__ = [
    "COUNT",
    "INTEGER",
    "MOMENTUM",
    "NON_NEGATIVE",
    "NON_NEGATIVE_INT",
    "RATE",
    "Arm",
    "ArmResult",
    "FGESettings",
    "ImageDataset",
    "MeasuredSpread",
    "Number",
    "RecipeSpec",
    "SWASettings",
    "check_distinct",
    "check_epochs",
    "check_swa_start",
    "check_warmup",
    "check_within_epochs",
    "describe_preset",
    "parse_recipe_args",
    "recipe_main",
    "recipe_parser",
]


def recipe_parser(doc: str, presets: Presets, name: str) -> tuple[argparse.ArgumentParser, Callable[..., str]]:
    """The shared command line of recipe ``name`` (its first ``doc`` paragraph as the description),
    and the help builder for its preset-controlled options: ``h(key, text)`` says each preset's value."""
    return base_parser(doc.split("\n\n")[0], presets, name), partial(preset_help, presets)


def describe_preset(parser: argparse.ArgumentParser, text: str) -> None:
    """Add a preset of the recipe's own (``"medium = ..."``) to ``--preset``'s help, after the shared ones."""
    for action in parser._actions:
        if action.dest == "preset":
            action.help = f"{action.help}; {text}"


def parse_recipe_args(parser: argparse.ArgumentParser, presets: Presets,
                      argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed, with the chosen preset filling every option not given; every numeric value checked
    against its option's range (the preset's too)."""
    args = apply_preset(parser.parse_args(argv), presets)
    check_numbers(parser, args)
    return args


def recipe_main(spec: RecipeSpec, args: argparse.Namespace) -> int:
    """Run the recipe ``spec`` with ``args``; the exit status."""
    run_recipe(spec, args)
    return 0
