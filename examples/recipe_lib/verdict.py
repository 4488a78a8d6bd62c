"""The plain-language verdict that ends every recipe run.

A table of accuracies does not say whether a difference means anything, so a
run ends with a few sentences: what was compared and what came out, how large
the seed-to-seed spread of this recipe is (from docs/RESULTS.md, for one-seed
runs; this run's own spread when it has several seeds), how to measure the
noise, and how far the numbers carry to another machine.

The measured spreads are data in the recipe files (:class:`MeasuredSpread`),
copied from docs/RESULTS.md's tables: a one-seed run cannot estimate its own
noise, and recomputing the spread would take three quick-preset runs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

# Where docs/RESULTS.md's three-seed tables were measured (the same runs for every recipe).
RESULTS_MACHINE = "the real Fashion-MNIST, seeds 0 1 2, on an Intel Xeon (AVX-512) with 2 threads"

# Results are bitwise reproducible on one machine, but the CPU's vector ISA changes the rounding of the
# kernels (torch's and ours): seed 0 of the tutorial gave 87.45 on an AVX-512 and 87.65 on an AVX2 machine.
REPRODUCIBILITY = ("Reproducibility: the same command on the same machine gives the same numbers; across CPU "
                   "types (vector ISA: AVX-512, AVX2) they vary by a few tenths of a point, and GPU runs differ "
                   "again.")

PerSeed = Sequence[Mapping[str, float]]  # one final-metrics row per seed, with "seed" and "test_acc"


@dataclass(frozen=True)
class MeasuredSpread:
    """The seed-to-seed spread of one recipe's preset, as docs/RESULTS.md measured it.

    Attributes:
        std_points: row label -> sample std of the test accuracy over the
            measured seeds, in accuracy points (the "± x" of RESULTS.md's table).
        measured_on: data, seeds and machine of those runs.
    """

    std_points: Mapping[str, float]
    measured_on: str = RESULTS_MACHINE


def _points(per_seed: PerSeed) -> list[float]:
    return [100 * row["test_acc"] for row in per_seed]


def _accuracy(per_seed: PerSeed) -> str:
    """``87.30%`` for one seed, ``86.90 ± 0.92%`` (mean ± sample std) for several."""
    values = _points(per_seed)
    if len(values) == 1:
        return f"{values[0]:.2f}%"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}%"


def _difference(per_seed: PerSeed, baseline: PerSeed) -> float:
    return statistics.fmean(_points(per_seed)) - statistics.fmean(_points(baseline))


def _seeds_ahead(per_seed: PerSeed, baseline: PerSeed) -> tuple[int, int]:
    """(seeds where the row beat the baseline, seeds both have): the arms share each seed's data and init."""
    base = {row["seed"]: row["test_acc"] for row in baseline}
    shared = [(row["test_acc"], base[row["seed"]]) for row in per_seed if row["seed"] in base]
    return sum(a > b for a, b in shared), len(shared)


def pick_headline(rows: Mapping[str, PerSeed], candidates: Sequence[str]) -> tuple[str | None, int]:
    """The candidate row with the best mean accuracy, and how many candidates were trained."""
    present = [label for label in candidates if label in rows]
    if not present:
        return None, 0
    best = max(present, key=lambda label: statistics.fmean(_points(rows[label])))
    return best, len(present)


def comparison_lines(rows: Mapping[str, PerSeed], baseline: str, candidates: Sequence[str],
                     describe: Callable[[str], str]) -> list[str]:
    """What was compared and what came out: the headline row against the baseline, then the other rows."""
    headline, count = pick_headline(rows, candidates)
    if headline is None:
        only = next(iter(rows))
        return [f"Only {describe(only)} was trained: {_accuracy(rows[only])} test accuracy; nothing was compared."]
    name = describe(headline) + (f" (the best of {count} settings)" if count > 1 else "")
    if baseline not in rows:
        return [f"{name} reached {_accuracy(rows[headline])} test accuracy; {describe(baseline)} was not trained, "
                "so nothing was compared."]
    seeds = len(rows[headline])
    diff = _difference(rows[headline], rows[baseline])
    over = "on one seed" if seeds == 1 else f"mean ± std over {seeds} seeds"
    lines = [f"{name} reached {_accuracy(rows[headline])} test accuracy vs {_accuracy(rows[baseline])} for "
             f"{describe(baseline)} ({diff:+.2f} points, {over})."]
    others = [label for label in rows if label not in (baseline, headline)]
    if others:
        lines.append(f"The other rows vs {describe(baseline)}: "
                     + ", ".join(f"{label} {_difference(rows[label], rows[baseline]):+.2f}" for label in others)
                     + " points (table above).")
    if seeds > 1:
        lines.append(_noise_sentence(rows[headline], rows[baseline], describe(baseline)))
    return lines


def _noise_sentence(per_seed: PerSeed, baseline: PerSeed, baseline_name: str) -> str:
    """Whether the difference of the means exceeds this run's seed-to-seed spread."""
    diff = abs(_difference(per_seed, baseline))
    spread = max(statistics.stdev(_points(per_seed)), statistics.stdev(_points(baseline)))
    ahead, shared = _seeds_ahead(per_seed, baseline)
    relation = ("larger than" if diff > spread else "within")
    meaning = ("" if diff > spread else ": this run cannot tell the two apart")
    return (f"The difference ({diff:.2f} points) is {relation} this run's seed-to-seed spread (std up to "
            f"{spread:.2f} points){meaning}; ahead of {baseline_name} on {ahead} of {shared} seeds.")


def spread_line(spread: MeasuredSpread | None, preset: str, labels: Sequence[str], seeds: int) -> str | None:
    """The measured spread of this recipe's preset as context, or None where docs/RESULTS.md has none."""
    if spread is None:
        return None
    known = [(label, spread.std_points[label]) for label in labels if label in spread.std_points]
    if not known:  # rows of other settings: the preset's range is still the scale of the noise
        low, high = min(spread.std_points.values()), max(spread.std_points.values())
        figures = f"std {low:.2f}-{high:.2f} points over its rows"
    else:
        figures = "std " + ", ".join(f"{std:.2f} points ({label})" for label, std in known)
    # One seed cannot measure its own noise: the measured spread is then the yardstick.
    ending = " A one-seed difference smaller than that is within the noise." if seeds == 1 else ""
    return (f"Seed-to-seed spread of this recipe's {preset} preset, measured on {spread.measured_on} "
            f"(docs/RESULTS.md): {figures}.{ending}")


def verdict_lines(rows: Mapping[str, PerSeed], baseline: str, candidates: Sequence[str], preset: str,
                  dataset: str, measured: Mapping[str, MeasuredSpread],
                  describe: Callable[[str], str] = str, findings: Sequence[str] = ()) -> list[str]:
    """The verdict block: a title line, then one ``- `` bullet per sentence (plain text and Markdown alike).

    ``measured``: preset -> its spread from docs/RESULTS.md (Fashion-MNIST runs, so used for that data only).
    ``findings``: the recipe's own sentences about what came out, right after the comparison.
    """
    candidates = [label for label in candidates if label != baseline]  # e.g. large_batch --arms sb
    sentences = comparison_lines(rows, baseline, candidates, describe) + list(findings)
    headline, _ = pick_headline(rows, candidates)
    seeds = max((len(per_seed) for per_seed in rows.values()), default=0)
    spread = measured.get(preset) if dataset == "fashion_mnist" else None
    context = spread_line(spread, preset, [label for label in (baseline, headline) if label], seeds)
    if context:
        sentences.append(context)
    elif preset != "smoke":
        where = "" if dataset == "fashion_mnist" else f" on {dataset}"
        sentences.append(f"docs/RESULTS.md has no measured seed-to-seed spread for the {preset} preset{where}.")
    if seeds == 1:
        sentences.append("For a noise estimate of your own, run it with --seeds 0 1 2: mean ± std over three "
                         "seeds, and whether the difference exceeds the spread (three times the time).")
    if preset == "smoke":
        sentences.append("This was the smoke preset: it checks that every arm and the report run end to end; "
                         "its accuracies are not a result. Drop --preset smoke for the quick preset, whose "
                         "results docs/RESULTS.md gives.")
    sentences.append(REPRODUCIBILITY)
    return ["Verdict:"] + [f"- {sentence}" for sentence in sentences]
