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


OFFICIAL_FINETUNE_SIZE = 384  # ALBEF's (and ELIP's) fine-tuning configs: retrieval, VQA, NLVR2, SNLI-VE


def official_image_size(args) -> Optional[int]:
    """--image-size, else for ``train`` of a downstream task from an ALBEF/ELIP checkpoint the official fine-tuning
    size, else None (the checkpoint's own)."""
    size = getattr(args, "image_size", None)
    if size is not None:
        if isinstance(size, bool) or size < 1:
            raise ValueError(f"--image-size must be >= 1 pixels, got {size}")
        return size
    train = getattr(args, "command", None) == "train" or hasattr(args, "official_dir")
    if train and args.format in ("albef", "elip") and getattr(args, "task", None) != "pretrain":
        return OFFICIAL_FINETUNE_SIZE
    return None


def text_cleaning(args) -> str:
    return args.text_cleaning or ("albef" if args.format in ("albef", "elip") else "none")


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
    g.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="with --init-official: image size to run at (position embeddings interpolated) (default: "
                   + ("the checkpoint's own" if eval_flags else "the task's official fine-tuning size: ALBEF/ELIP "
                      f"{OFFICIAL_FINETUNE_SIZE}, the checkpoint's own for pretrain and the other formats") + ")")
    g.add_argument("--text-cleaning", choices=("albef", "none"), default=None,
                   help="with --init-official: clean captions as the official code does (albef: lower case, "
                   "punctuation dropped, at most 30 words and 30 tokens) (default: albef for albef/elip, else none)")
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
        for flag, dest in (("--format", "format"), ("--image-size", "image_size"), ("--text-cleaning", "text_cleaning")):
            if getattr(args, dest, None) is not None:
                raise ValueError(f"{flag} is for --init-official PATH")
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

    from vlprune.data.tokenizer import TextTokenizer

    size = official_image_size(args)
    model, report = load_official(args.init_official, args.format, heads=args.official_heads,
                                  strict=args.official_strict == "yes", image_size=size)
    print(report.table())
    # the BERT vocabulary, with the official text cleaning, travels with the converted model
    TextTokenizer.from_dir(args.tokenizer).with_cleaning(text_cleaning(args)).save(Path(dest) / "tokenizer")
    extra = {"official": {"source": str(Path(args.init_official).resolve()), "format": args.format,
                          "variant": report.variant, "image_size": model.cfg.vision.image_size,
                          "text_cleaning": text_cleaning(args)},
             "tokenizer": "tokenizer"}
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
