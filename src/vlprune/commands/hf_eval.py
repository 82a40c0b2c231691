"""``vlprune eval vqa|retrieval --hf DIR_OR_ID``: a Hugging Face model with its own processor, patched with the method
flags (``--method trips --keep 0.5``), on the field's annotation file: VQA (``BlipForQuestionAnswering``,
``ViltForQuestionAnswering``) or retrieval (``BlipForImageTextRetrieval``: ITC, then ITM re-ranking; ``CLIPModel``:
ITC ranking, image-only methods; ``ViltForImageAndTextRetrieval``, ``BridgeTowerForImageAndTextRetrieval``: every
image-caption pair scored by the model's retrieval head, at most ``--max-pairs`` pairs).

    vlprune eval vqa --hf Salesforce/blip-vqa-base --method trips --keep 0.5 --test ann.json --images DIR --json
    vlprune eval retrieval --hf Salesforce/blip-itm-base-coco --method trips --keep 0.5 --test test.json --k 16
    vlprune eval retrieval --hf openai/clip-vit-base-patch16 --method tome --test test.json
    vlprune eval retrieval --hf dandelin/vilt-b32-finetuned-coco --method trips --keep 0.5 --test test.json
"""

from __future__ import annotations

import json
from pathlib import Path

from .method_flags import method_config


def run_hf(args) -> int:
    import torch

    from vlprune.data.formats import load_retrieval, load_vqa
    from vlprune.patch import patch
    from vlprune.patch.hub import load_hf
    from vlprune.tasks.hf_vqa import evaluate_vqa, load_processor

    if args.task not in ("vqa", "retrieval"):
        raise ValueError(f"--hf evaluates vqa (BLIP, ViLT, LLaVA, LLaVA-NeXT, Qwen2-VL) and retrieval (BLIP ITM, CLIP ITC, ViLT and BridgeTower pair scoring); got task {args.task!r}")
    if args.test is None or not Path(args.test).is_file():
        raise FileNotFoundError(f"--hf needs --test, a {args.task} annotation file; not found: {args.test}")
    root = Path(args.images) if args.images else Path(args.test).parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root directory not found: {root}")
    entries = load_retrieval(args.test, "test") if args.task == "retrieval" else load_vqa(args.test)
    model = load_hf(args.hf)
    if args.task == "vqa" and args.predictions is None:
        _need_answers(model, entries, args.test)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    rc = method_config(args)
    if rc is not None:
        patch(model, rc)
    name = "none" if rc is None else rc.name
    if args.task == "retrieval":
        return _retrieval(args, model, entries, root, rc)
    res = evaluate_vqa(model, load_processor(args.hf), entries, root, args.batch_size, progress=not args.quiet)
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


def _need_answers(model, entries, test) -> None:
    """A vision-language LLM's open-ended answers are scored against every entry's "answer" list: refuse a file
    without them unless the run only writes predictions."""
    from vlprune.tasks.hf_vqa import LVLM_CLASSES

    if type(model).__name__ not in LVLM_CLASSES:
        return
    for i, e in enumerate(entries):
        a = e.get("answer")
        if not isinstance(a, list) or not a or not all(isinstance(x, str) for x in a):
            raise ValueError(f"{test}: entry {i} has no \"answer\" list of strings (the annotators' answers, got "
                             f"{a!r}); the VQA accuracy of {type(model).__name__} needs one per question (give "
                             "--predictions FILE to only write the answers)")


def _retrieval(args, model, entries, root: Path, rc) -> int:
    from vlprune.tasks.hf_retrieval import PAIR_CLASSES, evaluate_blip_retrieval, evaluate_clip_retrieval
    from vlprune.tasks.hf_vqa import load_processor

    if type(model).__name__ in PAIR_CLASSES:
        return _pair_retrieval(args, model, entries, root, rc)
    clip = type(model).__name__ == "CLIPModel"
    if clip:
        res = evaluate_clip_retrieval(model, load_processor(args.hf), entries, root, args.batch_size,
                                      progress=not args.quiet)
    else:
        res = evaluate_blip_retrieval(model, load_processor(args.hf), entries, root, args.k, args.batch_size,
                                      progress=not args.quiet)
    m = res["metrics"]
    name = "none" if rc is None else rc.name
    how = "ITC ranking" if clip else f"ITM re-ranking top {args.k}"
    print(f"retrieval on {args.test} ({res['images']} images, {res['captions']} captions), {type(model).__name__} from "
          f"{args.hf}, method {name if rc is None else rc.to_dict()}, {how}")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
    if clip:
        tokens = "n/a" if res["image_tokens"] is None else f"{res['image_tokens']:.1f}"
        print(f"  image tokens after the patched encoder {tokens}, {res['itc_seconds']:.1f} s")
    else:
        print(f"  ITC stage {res['itc_seconds']:.1f} s, ITM stage {res['itm_seconds']:.1f} s")
    if args.json:
        extra = {"image_tokens": res["image_tokens"]} if clip else {}
        print(json.dumps({**m, "method": name, "method_config": None if rc is None else rc.to_dict(),
                          "images": res["images"], "captions": res["captions"], "itc_seconds": res["itc_seconds"],
                          "itm_seconds": res["itm_seconds"], "model": args.hf, **extra}))
    return 0


def _pair_retrieval(args, model, entries, root: Path, rc) -> int:
    """ViLT and BridgeTower retrieval: every image-caption pair through the model's retrieval head."""
    from vlprune.tasks.hf_retrieval import MAX_PAIRS, evaluate_pair_retrieval
    from vlprune.tasks.hf_vqa import load_processor

    max_pairs = MAX_PAIRS if args.max_pairs is None else args.max_pairs
    res = evaluate_pair_retrieval(model, load_processor(args.hf), entries, root, args.batch_size, max_pairs,
                                  progress=not args.quiet)
    m, name = res["metrics"], "none" if rc is None else rc.name
    print(f"retrieval on {args.test} ({res['images']} images, {res['captions']} captions, {res['pairs']} pairs), "
          f"{type(model).__name__} from {args.hf}, method {name if rc is None else rc.to_dict()}, every pair scored "
          "by the retrieval head")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
    tokens = "n/a" if res["image_tokens"] is None else f"{res['image_tokens']:.1f}"
    print(f"  image tokens after the patched layers {tokens}, {res['pair_seconds']:.1f} s")
    if args.json:
        print(json.dumps({**m, "method": name, "method_config": None if rc is None else rc.to_dict(),
                          "images": res["images"], "captions": res["captions"], "pairs": res["pairs"],
                          "pair_seconds": res["pair_seconds"], "image_tokens": res["image_tokens"], "model": args.hf}))
    return 0
