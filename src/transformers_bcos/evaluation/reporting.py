"""Reporting experiments: seed statistics and the marked sections of RESULTS.md that each
experiment script (``examples/model_guidance.py``, ``examples/e2kd.py``) rewrites."""

import json
import os
import statistics
from typing import Optional


def mean_and_spread(values: list, percent: bool = False) -> str:
    """"mean ± standard deviation" over seeds (0 spread for one value); ``percent``: fractions as %."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    if percent:
        return f"{100 * statistics.mean(values):.1f}% ± {100 * spread:.1f}"
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def gridpg_cell(result: Optional[dict]) -> str:
    """A GridPG result (`grid_pointing_game`) as a table cell: **mean** / median (quartiles), and
    how many grids were built where fewer than asked; "n/a" for None."""
    if result is None:
        return "n/a"
    if result["num_grids_built"] == 0:
        return f"no grid (0 of {result['num_grids_requested']})"
    cell = f"**{result['mean']:.3f}** / {result['median']:.3f} ({result['q1']:.2f}–{result['q3']:.2f})"
    if result["num_grids_built"] < result["num_grids_requested"]:
        cell += f", {result['num_grids_built']} of {result['num_grids_requested']} grids"
    return cell


def write_marked_section(path: str, name: str, text: str) -> None:
    """Replace what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` by
    ``text``; a SystemExit naming the markers when the file lacks them (nothing is written)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if begin not in content or end not in content:
        raise SystemExit(f"{path} has no {begin} ... {end} markers to write between.")
    before, rest = content.split(begin, 1)
    after = rest.split(end, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(before + begin + "\n" + text + "\n" + end + after)


def run_description(minutes: float) -> str:
    """"12.3 min on 2 CPU cores (x86_64), torch 2.13.0": where an experiment ran, for its table."""
    import platform

    import torch

    return f"{minutes:.1f} min on {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"


def write_experiment_results(output_dir: str, record: dict, text: str, results_path: Optional[str], section: str) -> None:
    """Write an experiment's ``record`` (results.json) and its table ``text`` (results.md) to
    ``output_dir``, print the text, and put it into ``results_path``'s ``section`` if given."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    if results_path:
        write_marked_section(results_path, section, text)
