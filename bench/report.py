"""`vmmalloc report`: bench/results/*.json -> bench/RESULTS.md, PNG plots, the README's headline.

Each benchmark module's summary(result) gives its rows (measure, value, target); a target
of the form "<= 1.05" or ">= 0.97x" is checked against the value's number. The headline
is every row that has such a target.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from bench.run import BENCHMARKS

HEADLINE_BEGIN = "<!-- vmmalloc report: headline begin (written by `vmmalloc report --write`) -->"
HEADLINE_END = "<!-- vmmalloc report: headline end -->"
_TARGET = re.compile(r"^\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)")
_NUMBER = re.compile(r"[-+]?[0-9]*\.?[0-9]+")


def result_stem(name: str, backend: str) -> str:
    """The file name (without .json) a benchmark writes its result to."""
    return f"{name}_{backend}" if name == "core_hot_path" else name


def module_for(result: dict[str, Any]):
    """The benchmark module that wrote `result`, or None (an ad hoc result such as a recheck)."""
    name = str(result.get("benchmark", ""))
    for suffix in ("_cuda", "_host"):
        if name.endswith(suffix) and name[: -len(suffix)] in BENCHMARKS:
            name = name[: -len(suffix)]
    if name not in BENCHMARKS:
        return None
    return importlib.import_module(BENCHMARKS[name])


def target_met(value: str, target: str) -> bool | None:
    """Whether a single-number value meets a "<= x" / ">= x" target; None when not checkable."""
    match = _TARGET.match(target)
    numbers = _NUMBER.findall(value)
    if match is None or len(numbers) != 1:
        return None
    op, bound, number = match.group(1), float(match.group(2)), float(numbers[0])
    return {"<=": number <= bound, ">=": number >= bound, "<": number < bound, ">": number > bound}[op]


def rows_for(result: dict[str, Any]) -> list[tuple[str, str, str, bool | None]] | None:
    """(measure, value, target, met) rows of a result, or None when no module summarizes it."""
    module = module_for(result)
    if module is None:
        return None
    try:
        rows = module.summary(result)
    except (KeyError, TypeError, IndexError):  # an older result's layout
        return None
    return [(measure, value, target, target_met(value, target)) for measure, value, target in rows]


def _machine(result: dict[str, Any]) -> str:
    env = result.get("environment", {})
    gpu = env.get("gpu") or "no GPU (host backend)"
    parts = [gpu, f"driver {env['driver']}" if env.get("driver") else None,
             f"torch {env.get('torch')}", f"transformers {env.get('transformers')}", env.get("date")]
    return ", ".join(p for p in parts if p)


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: ""}[met]


def _table(rows: list[tuple[str, str, str, bool | None]]) -> list[str]:
    lines = ["| measure | value | target | |", "|---|---|---|---|"]
    lines += [f"| {m.strip()} | {v} | {t} | {_mark(ok)} |" for m, v, t, ok in rows]
    return lines


def _taken(result: dict[str, Any]) -> str:
    """Where and when, short: the GPU (with their count) and the day."""
    env = result.get("environment", {})
    gpu = env.get("gpu") or "host backend"
    count = env.get("gpu_count") or 1
    where = f"{count}x {gpu}" if count > 1 and env.get("gpu") else gpu
    return ", ".join(p for p in (where, str(env.get("date", ""))[:10]) if p)


def headline_table(results: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Every row with a checkable target, one table, each row with where and when it was taken."""
    lines = ["| benchmark | measure | value | target | | taken on |", "|---|---|---|---|---|---|"]
    for path, result in results:
        for measure, value, target, met in rows_for(result) or []:
            if met is not None:
                lines.append(f"| {path.stem} | {measure.strip()} | {value} | {target} | {_mark(met)} | {_taken(result)} |")
    return lines


def load_results(results_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The JSON results in `results_dir`, by file name; a file that is not JSON is an error."""
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            out.append((path, json.loads(path.read_text())))
        except ValueError as error:
            raise SystemExit(f"vmmalloc report: {path} is not valid JSON ({error}); rerun its benchmark") from None
    if not out:
        raise SystemExit(f"vmmalloc report: no results (*.json) in {results_dir}; run `vmmalloc bench` first")
    return out


def _plot(path: Path, result: dict[str, Any]) -> Path | None:
    module = module_for(result)
    if module is None or not hasattr(module, "plot_result"):
        return None
    png = path.with_suffix(".png")
    module.plot_result(result, png)
    return png


def write_report(results_dir: Path, output: Path, readme: Path | None = None, plots: bool = True) -> list[Path]:
    """Writes the report (and plots, and the README's headline); returns the files written."""
    results = load_results(results_dir)
    output = Path(output)
    written: list[Path] = []
    lines = ["# Benchmark results", "",
             "Written by `vmmalloc report --write` from the JSON results beside it; rerun it rather than edit this "
             "file. How each figure is measured, and why targets are missed: [NOTES.md](NOTES.md).", "",
             "## Headline", "", *headline_table(results), ""]
    for path, result in results:
        lines += [f"## {path.stem}", "", f"Taken on {_machine(result)}.", ""]
        rows = rows_for(result)
        if rows is None:
            note = result.get("note", "")
            lines += [f"No summary table for this result{': ' + note if note else ''}. "
                      f"Raw figures: [{path.name}]({_relative(path, output)}).", ""]
        else:
            lines += [*_table(rows), ""]
        png = _plot(path, result) if plots else None
        if png is not None:
            written.append(png)
        png = png or (path.with_suffix(".png") if path.with_suffix(".png").exists() else None)
        if png is not None:
            lines += [f"![{path.stem}]({_relative(png, output)})", ""]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines))
    written.append(output)
    if readme is not None and update_readme(Path(readme), headline_table(results)):
        written.append(Path(readme))
    return written


def _relative(path: Path, output: Path) -> str:
    try:
        return path.resolve().relative_to(output.resolve().parent).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def update_readme(readme: Path, table: list[str]) -> bool:
    """Replaces the text between the headline markers; False (untouched) when they are absent."""
    text = readme.read_text()
    begin, end = text.find(HEADLINE_BEGIN), text.find(HEADLINE_END)
    if begin < 0 or end < begin:
        return False
    new = text[: begin + len(HEADLINE_BEGIN)] + "\n" + "\n".join(table) + "\n" + text[end:]
    if new != text:
        readme.write_text(new)
    return True
