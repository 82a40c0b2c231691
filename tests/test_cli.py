import subprocess
import sys

import pytest

from vlprune.cli import main


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "usage: vlprune" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0


def test_info_lists_presets_and_methods(capsys):
    assert main(["info", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "presets: albef-base, small, tiny, vilt-base" in out and "none" in out
    assert "  trips: vision/joint slots, mid; text-guided; defaults (12 layers) layers=(5, 10) keep=0.7" in out
    assert "elip: " in out and "lam=0.8 (in [0, 1])" in out and "tip: joint/fusion slots, mid; text-guided, learned" in out


def test_errors_go_to_stderr_with_nonzero_exit(capsys):
    assert main(["info", "--model", "huge"]) == 2
    err = capsys.readouterr().err
    assert "vlprune info: error: unknown model preset 'huge'" in err and "Traceback" not in err


def test_debug_shows_traceback():
    r = subprocess.run([sys.executable, "-m", "vlprune", "--debug", "info", "--model", "huge"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vlprune", "info", "--model", "huge"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown model preset" in r.stderr


@pytest.mark.parametrize("argv", [["bench", "--opt", "r=2"], ["bench", "--meth", "trips"], ["--verb", "info"],
                                  ["train", "pretrain", "--out", "x", "--ste", "1"]])
def test_abbreviated_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_global_flags_after_the_subcommand(capsys, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["info", "--threads", "1", "--quiet"]) == 0
    assert main(["--threads", "2", "info", "-v"]) == 0  # before the sub-command too
    assert calls == [1, 2]
    with pytest.raises(ValueError, match="unknown model preset"):
        main(["info", "--model", "huge", "--debug"])
    assert main(["info", "--threads", "0"]) == 2 and "--threads must be >= 1" in capsys.readouterr().err


def test_help_shows_defaults_and_one_method_syntax(capsys):
    for cmd in ("train", "eval", "bench", "visualize"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "--method NAME" in out and "--option NAME=VALUE" in out and "--options" not in out, cmd
        assert "--threads" in out and "--quiet" in out, cmd
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "(default: 40)" in capsys.readouterr().out
