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
    assert main(["info", "--threads", "0"]) == 2 and "--threads must be an integer >= 1, got 0" in capsys.readouterr().err


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


def _exit_of(monkeypatch, capsys, raise_what):
    """The exit code and stderr of ``vlprune info`` when its run raises ``raise_what()``."""
    import vlprune.commands.info as info

    def boom(args):
        raise_what()

    monkeypatch.setattr(info, "run", boom)
    rc = main(["info"])
    return rc, capsys.readouterr().err


def test_exit_codes(monkeypatch, capsys):
    """0 success, 1 failure (not the input's fault: one line, the type, a pointer to --debug), 2 bad usage or
    input, 130 SIGINT, 143 SIGTERM (the signal itself, sent to the process)."""
    import errno
    import signal

    from vlprune.rundir import RunDirBusyError

    assert main(["info"]) == 0
    for exc, code in ((lambda: ValueError("bad value"), 2), (lambda: FileNotFoundError("no such file: x"), 2),
                      (lambda: RunDirBusyError("in use"), 2), (lambda: PermissionError("read-only: x"), 2),
                      (lambda: OSError(errno.ENOSPC, "No space left on device"), 1),
                      (lambda: RuntimeError("CUDA error: an illegal memory access"), 1), (lambda: 1 / 0, 1)):
        def raise_it(exc=exc):
            raise exc()
        rc, err = _exit_of(monkeypatch, capsys, raise_it)
        assert rc == code and err.count("\n") == 1 and "Traceback" not in err, (rc, err)
        assert ("--debug shows the traceback" in err) == (code == 1)
    rc, err = _exit_of(monkeypatch, capsys, lambda: (_ for _ in ()).throw(ZeroDivisionError()))
    assert rc == 1 and "ZeroDivisionError: ZeroDivisionError" in err  # never a blank reason
    rc, err = _exit_of(monkeypatch, capsys, lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert rc == 130
    before = signal.getsignal(signal.SIGTERM)
    rc, err = _exit_of(monkeypatch, capsys, lambda: signal.raise_signal(signal.SIGTERM))
    assert rc == 143 and "terminated" in err
    assert signal.getsignal(signal.SIGTERM) is before  # put back
    with pytest.raises(SystemExit) as e:
        main(["train"])  # argparse: a missing argument
    assert e.value.code == 2


def test_errors_name_the_flags(capsys, tmp_path):
    cases = [(["train", "pretrain", "--loss", "foo=2", "--out", str(tmp_path / "a")],
              "--loss: unknown option 'foo' for task 'pretrain'; valid: alpha, hard_ramp, itc, itm, mlm"),
             (["train", "vqa", "--loss", "itc=2", "--out", str(tmp_path / "a")], "--loss: unknown option 'itc' for task 'vqa'"),
             (["train", "pretrain", "--loss", "itc=high", "--out", str(tmp_path / "a")], "--loss: the value of itc must be a number, got 'high'"),
             (["train", "pretrain", "--lr-mult", "vision", "--out", str(tmp_path / "a")], "--lr-mult: expected NAME=VALUE"),
             (["train", "pretrain", "--batch-size", "0", "--out", str(tmp_path / "a")], "--batch-size must be an integer >= 1, got 0"),
             (["train", "pretrain", "--save-total-limit", "0", "--out", str(tmp_path / "a")], "--save-total-limit must be an integer >= 1"),
             (["train", "pretrain", "--max-image-pixels", "0", "--out", str(tmp_path / "a")], "--max-image-pixels must be an integer >= 1"),
             (["bench", "--model", "tiny", "--image-size", "30", "--flops-only"], "--image-size=30 is not divisible by vision.patch_size=8"),
             (["data", "scenes", "--image-size", "30", "--out", str(tmp_path / "s")], "--image-size must be an integer in [32, 1024], got 30")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "__init__" not in err, (argv, err)
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as e:
        main(["train", "pretrain", "--method", "trips", "--layers", "2.5", "--out", str(tmp_path / "a")])
    assert e.value.code == 2
    assert "argument --layers: expected comma-separated integers (e.g. 5,10), got '2.5'" in capsys.readouterr().err
