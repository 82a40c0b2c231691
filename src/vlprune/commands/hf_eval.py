"""``vlprune eval vqa --hf DIR_OR_ID``: a Hugging Face VQA model (BLIP, ViLT) with its own processor, patched with
the method flags (``--method trips --keep 0.5``), on a VQA annotation file.

    vlprune eval vqa --hf Salesforce/blip-vqa-base --method trips --keep 0.5 --test ann.json --images DIR --json
"""

from __future__ import annotations

import json
from pathlib import Path

from .method_flags import method_config


def run_hf(args) -> int:
    import torch

    from vlprune.data.formats import load_vqa
    from vlprune.patch import patch
    from vlprune.patch.hub import load_hf
    from vlprune.tasks.hf_vqa import evaluate_vqa, load_processor

    if args.task != "vqa":
        raise ValueError(f"--hf evaluates vqa (BLIP, ViLT question answering); got task {args.task!r}")
    if args.test is None or not Path(args.test).is_file():
        raise FileNotFoundError(f"--hf needs --test, a VQA annotation file; not found: {args.test}")
    root = Path(args.images) if args.images else Path(args.test).parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root directory not found: {root}")
    entries = load_vqa(args.test)
    model = load_hf(args.hf)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    rc = method_config(args)
    if rc is not None:
        patch(model, rc)
    res = evaluate_vqa(model, load_processor(args.hf), entries, root, args.batch_size, progress=not args.quiet)
    name = "none" if rc is None else rc.name
    if args.predictions is not None:
        Path(args.predictions).write_text(json.dumps(
            [{"question_id": e["question_id"], "answer": a} for e, a in zip(entries, res["predictions"])]))
    acc = "n/a (no answers in the test file)" if res["accuracy"] is None else f"{res['accuracy']:.2f}"
    print(f"vqa on {args.test} ({res['examples']} examples), {type(model).__name__} from {args.hf}, method "
          f"{name if rc is None else rc.to_dict()}")
    tokens = "n/a" if res["image_tokens"] is None else f"{res['image_tokens']:.1f}"
    print(f"  accuracy {acc}, image tokens after the patched encoder {tokens}, {res['seconds']:.1f} s")
    if args.json:
        print(json.dumps({"accuracy": res["accuracy"], "method": name, "method_config": None if rc is None else rc.to_dict(),
                          "examples": res["examples"], "image_tokens": res["image_tokens"], "seconds": res["seconds"],
                          "model": args.hf}))
    return 0
