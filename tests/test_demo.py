"""The demo end to end, at its smallest: scenes data, pre-training, fine-tuning, evaluation, bench, report."""

import json

from vlprune.cli import main


def test_quick_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--methods", "none,trips", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "| trips | fine-tuned with it |" in report and "| none | fine-tuned with it |" in report
    assert "| trips | at inference only |" in report
    assert (out / "report.html").is_file() and (out / "tradeoff_vqa.png").stat().st_size > 1000
    assert (out / "overlay_trips.png").stat().st_size > 1000
    rows = {(r["method"], r["setup"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    tuned = rows[("trips", "fine-tuned with it")]
    assert tuned["image_tokens"] < rows[("none", "fine-tuned with it")]["image_tokens"]
    assert tuned["gflops_image"] < rows[("none", "fine-tuned with it")]["gflops_image"]
    assert 0 <= tuned["ground_rec"] < 1 and rows[("none", "fine-tuned with it")]["ground_rec"] == 1.0
    assert "report:" in printed
    # an existing output directory is not replaced without --overwrite
    assert main(["demo", "--quick", "--methods", "none", "--out", str(out)]) == 2
