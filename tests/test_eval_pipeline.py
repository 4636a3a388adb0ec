"""`moecompress eval` and `moecompress report` on the tiny reference model: real lm-eval numbers, atomic reports."""

import json

from cli_helpers import run_cli


def test_eval_with_baseline_and_report(tiny_reference, reference_env, tmp_path, capsys):
    code, out, err = run_cli(capsys, "prune", tiny_reference, "-m", "frequency", "--ratio", "0.25", "--samples", 8,
                             "--seq-len", 64, "-o", tmp_path / "pruned")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", tmp_path / "pruned", "--tasks", "reference_facts,reference_facts_ppl",
                             "--limit", 8, "--baseline", tiny_reference, "-o", tmp_path / "report")
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["facts"]["experts_per_layer"] == [6, 6]
    assert report["baseline_facts"]["experts_per_layer"] == [8, 8]
    assert "reference_facts" in report["results"]["results"] and "reference_facts" in report["baseline"]["results"]
    assert (tmp_path / "report" / "report.md").read_text().count("recovery") >= 1
    code, _, err = run_cli(capsys, "eval", tmp_path / "pruned", "--tasks", "reference_facts", "-o", tmp_path / "report")
    assert code == 2 and "--overwrite" in err
    code, out, err = run_cli(capsys, "report", tmp_path / "report", tmp_path / "report", "-o", tmp_path / "cmp")
    assert code == 0, err
    assert (tmp_path / "cmp" / "comparison.md").exists() and (tmp_path / "cmp" / "pareto.png").exists()
