"""The README's benchmark table is the one bench/results.json gives; every figure there is one a bench prints."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_results_module():
    spec = importlib.util.spec_from_file_location("bench_results", ROOT / "bench" / "_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results_module = load_results_module()


def benches() -> list[str]:
    return sorted(f"bench/{p.name}" for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))


def test_readme_table_is_the_one_results_json_gives():
    results = results_module.read_results(ROOT / "bench" / "results.json")
    table = results_module.readme_table((ROOT / "README.md").read_text())
    assert table == results_module.render_table(results), (
        "README.md's bench table differs from bench/results.json: run `python bench/_results.py --readme`"
    )


def test_every_bench_has_figures_with_verdicts_that_follow_from_them():
    results = results_module.read_results(ROOT / "bench" / "results.json")
    assert sorted(results) == benches()
    for bench, entry in results.items():
        assert entry["figures"], bench
        assert set(entry["load_average"]) == {"start", "end"}, bench
        for fig in entry["figures"]:
            assert math.isfinite(fig["value"]), (bench, fig)
            if fig["target"] is None:
                assert fig["met"] is None, (bench, fig)
            else:
                op, bound = fig["target"]
                assert fig["met"] is (fig["value"] >= bound if op == ">=" else fig["value"] <= bound), (bench, fig)


def test_every_miss_is_marked_in_the_table(tmp_path):
    report = results_module.Report("bench/x.py", quick=True, path=tmp_path / "r.json")
    report.figure("speed-up", 1.2, "x", target=(">=", 1.5))
    report.figure("memory", 0.5, "GiB", target=("<=", 2))
    report.figure("time", 3.0, "s")
    report.figure("max |diff|", 1.8e-7, "", target=("<=", 1e-5))
    report.write()
    rows = results_module.render_table(results_module.read_results(tmp_path / "r.json")).splitlines()[2:]
    assert len(rows) == 4
    assert "| speed-up | ≥ 1.50× | **1.20× (missed)** |" in rows[0]
    assert "| memory | ≤ 2.00 GiB | 0.50 GiB |" in rows[1] and "missed" not in rows[1]
    assert "| time | — | 3.00 s |" in rows[2]
    assert "| max \\|diff\\| | ≤ 1.0e-05 | 1.8e-07 |" in rows[3]  # a small value is kept, a | escaped


def test_a_bench_run_replaces_only_its_own_entries(tmp_path, capsys):
    path = tmp_path / "results.json"
    for bench, value in (("bench/a.py", 1.0), ("bench/b.py", 2.0), ("bench/a.py", 3.0)):
        report = results_module.Report(bench, quick=True, path=path)
        report.figure("ratio", value, "x", target=(">=", 2))
        report.write()
    results = json.loads(path.read_text())
    assert [(b, e["figures"][0]["value"], e["figures"][0]["met"]) for b, e in results.items()] == [
        ("bench/a.py", 3.0, True),
        ("bench/b.py", 2.0, True),
    ]
    out = capsys.readouterr().out
    assert "load average at start" in out and "load average at end" in out and "FIGURE ratio: 3.00×" in out


def test_a_missing_or_bad_figure_is_refused(tmp_path):
    report = results_module.Report("bench/x.py", quick=True, path=tmp_path / "r.json")
    with pytest.raises(ValueError, match="no figures"):
        report.write()
    with pytest.raises(ValueError, match="is nan"):
        report.figure("ratio", float("nan"), "x")
    report.figure("ratio", 1.0, "x")
    with pytest.raises(ValueError, match="recorded twice"):
        report.figure("ratio", 1.0, "x")
    with pytest.raises(ValueError, match="no rounds"):
        results_module.median_of_rounds([])
    with pytest.raises(ValueError, match="lacks the bench table markers"):
        results_module.readme_table("# a README without the table\n")
