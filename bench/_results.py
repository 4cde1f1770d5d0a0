"""What every bench shares: the load average at start and end, verdicts, and ``bench/results.json``.

A bench opens a ``Report``, hands it each figure it prints (``report.figure(name, value, unit, target=(">=", 5))``:
the verdict is computed here, from the value and the target, never by hand), and closes it: its entry in
``bench/results.json`` is replaced, the other benches' entries are kept. The README's benchmark table is rendered
from that file (``python bench/_results.py --readme``, which ``make bench`` runs); ``tests/test_bench_results.py``
checks that the two agree.

Timed figures are medians over interleaved rounds (``median_of_rounds``): each round times the baseline and the
measured code once, one after the other, so a load change from other processes hits both alike.

The leading underscore keeps this module out of ``make bench``'s list of benches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import operator
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
README = ROOT / "README.md"
TABLE_START = "<!-- bench table: generated from bench/results.json by `python bench/_results.py --readme` -->"
TABLE_END = "<!-- end of bench table -->"
OPS = {">=": operator.ge, "<=": operator.le}
UNITS = {"x": "×", "%": "%", "s": " s", "ms": " ms", "GiB": " GiB", "images/s": " images/s", "M": " M", "": ""}


def load_average() -> float:
    return os.getloadavg()[0]


def median_of_rounds(values: list[float]) -> float:
    if not values:
        raise ValueError("no rounds to take the median of")
    return statistics.median(values)


def format_value(value: float, unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; one of {sorted(UNITS)}")
    if unit == "" and float(value).is_integer():
        return str(int(value))  # a count
    magnitude = abs(value)
    text = f"{value:.0f}" if magnitude >= 100 else f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}"
    if magnitude < 0.1:
        text = f"{value:.3f}" if magnitude >= 0.001 or value == 0 else f"{value:.1e}"
    return text + UNITS[unit]


def format_target(target: list | tuple | None, unit: str) -> str:
    if target is None:
        return "—"
    op, bound = target
    return f"{'≥' if op == '>=' else '≤'} {format_value(bound, unit)}"


class Report:
    """The figures of one bench run; ``write()`` merges them into ``bench/results.json``."""

    def __init__(self, bench: str, *, quick: bool, path: Path = RESULTS):
        self.bench, self.quick, self.path = bench, quick, Path(path)
        self.figures: list[dict] = []
        self.load_start = load_average()
        print(f"[{bench}] load average at start: {self.load_start:.2f} on {os.cpu_count()} CPUs", flush=True)

    def figure(self, name: str, value: float, unit: str, *, target: tuple[str, float] | None = None) -> bool | None:
        """Record and print one figure; returns the verdict (None without a target)."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{self.bench}: figure {name!r} is {value}")
        if any(f["name"] == name for f in self.figures):
            raise ValueError(f"{self.bench}: figure {name!r} recorded twice")
        met = None
        if target is not None:
            op, bound = target
            if op not in OPS:
                raise ValueError(f"{self.bench}: figure {name!r}: target operator {op!r} is not one of {sorted(OPS)}")
            met = bool(OPS[op](value, bound))
            target = [op, float(bound)]
        self.figures.append({"name": name, "value": float(f"{value:.6g}"), "unit": unit, "target": target, "met": met})
        verdict = "" if met is None else f"   target {format_target(target, unit)}: {'met' if met else 'MISSED'}"
        print(f"  FIGURE {name}: {format_value(value, unit)}{verdict}", flush=True)
        return met

    def extend(self, figures: list[dict]) -> None:
        """Figures recorded (and printed) by another process of the same bench, e.g. one section of it."""
        for fig in figures:
            if any(f["name"] == fig["name"] for f in self.figures):
                raise ValueError(f"{self.bench}: figure {fig['name']!r} recorded twice")
            self.figures.append(fig)

    def write(self) -> dict:
        load_end = load_average()
        print(f"[{self.bench}] load average at end: {load_end:.2f}", flush=True)
        if not self.figures:
            raise ValueError(f"{self.bench}: no figures to write")
        entry = {
            "date": datetime.date.today().isoformat(),
            "quick": self.quick,
            "cpus": os.cpu_count(),
            "load_average": {"start": round(self.load_start, 2), "end": round(load_end, 2)},
            "figures": self.figures,
        }
        results = read_results(self.path) if self.path.exists() else {}
        results[self.bench] = entry
        self.path.write_text(json.dumps(dict(sorted(results.items())), indent=1, ensure_ascii=False) + "\n")
        misses = sum(f["met"] is False for f in self.figures)
        print(f"[{self.bench}] {len(self.figures)} figures written to {self.path.name}, {misses} of them missed")
        return entry


def read_results(path: Path = RESULTS) -> dict:
    results = json.loads(Path(path).read_text())
    if not isinstance(results, dict):
        raise ValueError(f"{path}: expected an object of benches")
    return results


def render_table(results: dict) -> str:
    """The README's benchmark table: every figure of every bench, each miss in bold and marked."""
    lines = [
        "| benchmark | figure | target | measured | run (load average start → end) |",
        "|---|---|---|---|---|",
    ]
    for bench, entry in sorted(results.items()):
        load = entry["load_average"]
        run = f"{entry['date']}{', --quick' if entry['quick'] else ''}, {entry['cpus']} CPUs, {load['start']:.2f} → {load['end']:.2f}"
        for fig in entry["figures"]:
            measured = format_value(fig["value"], fig["unit"])
            if fig["met"] is False:
                measured = f"**{measured} (missed)**"
            target = format_target(fig["target"], fig["unit"])
            name = fig["name"].replace("|", "\\|")  # a | would end the cell
            lines.append(f"| `{bench}` | {name} | {target} | {measured} | {run} |")
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    """The generated table in the README's text (between the two markers)."""
    if TABLE_START not in readme or TABLE_END not in readme:
        raise ValueError(f"README.md lacks the bench table markers {TABLE_START!r} ... {TABLE_END!r}")
    return readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip("\n")


def write_readme(results: dict, path: Path = README) -> None:
    text = path.read_text()
    readme_table(text)  # both markers are there
    before, rest = text.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    path.write_text(f"{before}{TABLE_START}\n{render_table(results)}\n{TABLE_END}{after}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's bench table from results.json")
    args = parser.parse_args()
    results = read_results()
    if args.readme:
        write_readme(results)
        print(f"README.md: bench table rewritten from {RESULTS.relative_to(ROOT)}")
    else:
        print(render_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
