"""scripts/bench_papers.py (the GPU benchmark of every method at each paper's configuration) runs on CPU with its
tiny ``--smoke`` setting and writes one markdown row per configuration, precision and method."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_papers.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_papers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(mod, out: Path, rows_file: Path, precisions, compiles=(False,), only=None):
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    expected = [(name, p, c, m) for name, (_, _, methods, _) in mod.CONFIGS.items() if only in (None, name)
                for p in precisions for c in compiles for m in ["none"] + [rc.name for rc in methods(2)]]
    assert [(r["config"], r["precision"], bool(r["compiled"]), r["method"]) for r in rows] == expected
    assert all(r["throughput"] > 0 and r["ideal_speedup"] > 0 for r in rows)
    text = out.read_text()
    assert "SMOKE" in text and text.count("\n| ") == len(rows) + 1  # header + one line per row
    if only is None:
        assert f"| trips-elip | {precisions[0]} | no | trips(placement=pre) |" in text


def _smoke(mod, tmp_path, *flags):
    """Run the script with --smoke and ``flags``; returns (markdown file, JSON-lines file)."""
    out, rows = tmp_path / "t.md", tmp_path / "r.jsonl"
    assert mod.main(["--smoke", "--threads", "1", *flags, "--out", str(out), "--json-out", str(rows)]) == 0
    return out, rows


def test_smoke_run_writes_the_table(tmp_path):
    mod = _load()
    _check(mod, *_smoke(mod, tmp_path, "--precision", "fp32"), ["fp32"])


@pytest.mark.slow
def test_smoke_run_bf16_and_compile(tmp_path):
    mod = _load()
    _check(mod, *_smoke(mod, tmp_path, "--precision", "bf16"), ["bf16"])
    _check(mod, *_smoke(mod, tmp_path, "--precision", "fp32", "--compile", "--only", "laps"), ["fp32"], (False, True),
           only="laps")
