"""``--init-official PATH --format albef|elip|laps|pumer-vilt`` for ``vlprune train`` and ``vlprune eval``: start
from (or evaluate) a checkpoint released with a paper's code.

The checkpoint is converted with ``vlprune.load_official`` into a vlprune model directory (``config.json`` +
``model.safetensors`` + ``official_report.json``), and the report of every key is printed as a table. ``train``
writes that directory beside the run (``OUT-official-init``, or ``--official-dir``) and fine-tunes from it as from
``--init``; ``eval`` converts into a temporary directory (``--official-report FILE`` keeps the JSON report). Official checkpoints carry no tokenizer: ``--tokenizer``
names a directory with the BERT ``vocab.txt`` they were trained with (bert-base-uncased for all four).
Without ``--method`` the format's own method runs (ELIP, LAPS official=True, TiP at PuMer's layers with PuMer's
placement and count; none for ALBEF).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def add_official_flags(p, eval_flags: bool = False) -> None:
    from vlprune.models.official import FORMATS

    g = p.add_argument_group("official checkpoints (ALBEF, ELIP, LAPS, PuMer)")
    g.add_argument("--init-official", default=None, metavar="PATH",
                   help="a checkpoint released with ALBEF, ELIP, LAPS or PuMer (.pth/.bin/.safetensors, or a PuMer "
                        "directory with config.json); needs --format and --tokenizer")
    g.add_argument("--format", default=None, choices=FORMATS, help="the code base the --init-official file comes from")
    g.add_argument("--official-heads", type=int, default=None, metavar="N",
                   help="attention heads of the official model (not stored in checkpoints; default width/64, i.e. 12)")
    g.add_argument("--official-strict", choices=("yes", "no"), default="yes",
                   help="'no': load what maps even when keys are unknown, missing or mismatched (all reported)")
    if eval_flags:
        g.add_argument("--tokenizer", default=None, help="with --init-official: directory with the BERT vocab.txt")
        g.add_argument("--official-report", default=None, metavar="FILE",
                       help="write the report of every key (JSON) to FILE (the table printed groups them)")
        g.add_argument("--answers", default=None,
                       help="with --init-official, vqa: JSON list of the answers in the official head's order")
    else:
        g.add_argument("--official-dir", default=None, metavar="DIR",
                       help="where the converted checkpoint goes (default: OUT-official-init beside --out)")


def check_official_flags(args) -> bool:
    """True when --init-official is used; raises naming the flag that is missing or clashes."""
    path, fmt = getattr(args, "init_official", None), getattr(args, "format", None)
    if path is None:
        if fmt is not None:
            raise ValueError("--format is for --init-official PATH")
        return False
    if fmt is None:
        raise ValueError("--init-official needs --format (albef, elip, laps or pumer-vilt)")
    if getattr(args, "init", None) is not None or getattr(args, "checkpoint", None) is not None:
        raise ValueError("give --init-official or --init/--checkpoint, not both")
    if getattr(args, "tokenizer", None) is None:
        raise ValueError("an official checkpoint has no tokenizer: give --tokenizer DIR with the BERT vocab.txt it "
                         "was trained with (bert-base-uncased)")
    if not Path(args.init_official).exists():
        raise FileNotFoundError(f"--init-official checkpoint not found: {args.init_official}")
    return True


def convert(args, dest: Path, answers: Optional[list] = None):
    """Convert ``args.init_official`` into the vlprune model directory ``dest``; prints the report; returns it."""
    from vlprune.models.build import save_pretrained
    from vlprune.models.official import load_official

    model, report = load_official(args.init_official, args.format, heads=args.official_heads,
                                  strict=args.official_strict == "yes")
    print(report.table())
    extra = {"official": {"source": str(Path(args.init_official).resolve()), "format": args.format,
                          "variant": report.variant},
             "tokenizer": str(Path(args.tokenizer).resolve())}
    if answers is not None:
        extra["answers"] = answers
    save_pretrained(model, dest, extra=extra)
    text = json.dumps(report.to_dict(), indent=1)
    (Path(dest) / "official_report.json").write_text(text)
    if getattr(args, "official_report", None):
        Path(args.official_report).write_text(text)
    return report


def use_reported_method(args, report) -> None:
    """Without --method, run the format's own method (the report's)."""
    from vlprune.commands.method_flags import DEST

    if not getattr(args, DEST, None) and report.method is not None:
        setattr(args, DEST, [dict(report.method)])
