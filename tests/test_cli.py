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


def test_errors_go_to_stderr_with_nonzero_exit(capsys):
    assert main(["info", "--model", "huge"]) == 2
    err = capsys.readouterr().err
    assert "vlprune info: error: unknown model preset 'huge'" in err and "Traceback" not in err


def test_debug_shows_traceback():
    r = subprocess.run([sys.executable, "-m", "vlprune", "--debug", "info", "--model", "huge"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vlprune", "info", "--model", "huge"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown model preset" in r.stderr
