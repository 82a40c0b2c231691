"""``vlprune eval caption`` flags and its Hugging Face path, and ``vlprune eval grounding``.

    vlprune train caption --init runs/pt --steps 300 --out runs/cap          # built-in scenes captions
    vlprune eval caption --checkpoint runs/cap --method tome --keep 0.7 --predictions results.json --json
    vlprune eval caption --test coco_karpathy_test.json --references coco_karpathy_test_gt.json --images COCO \\
        --hf Salesforce/blip-image-captioning-base --method tome --json
    vlprune eval grounding --checkpoint runs/ret --method trips --keep 0.5 --json         # scenes referring expressions
    vlprune eval grounding --checkpoint runs/ret --test refcoco+_test.json --dets dets.json --images COCO --json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_caption_flags(p) -> None:
    g = p.add_argument_group("caption / grounding")
    g.add_argument("--num-beams", type=int, default=3, help="caption: beams (1 = greedy; BLIP: 3)")
    g.add_argument("--max-length", type=int, default=20, help="caption: tokens incl. the prompt's (BLIP: 20)")
    g.add_argument("--min-length", type=int, default=5, help="caption: tokens incl. the prompt's (BLIP: 5)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="caption: CTRL penalty (BLIP: 1.0)")
    g.add_argument("--prompt", default="a picture of ", help="caption: the decoder's prompt (BLIP's default)")
    g.add_argument("--guide", choices=("prompt",), default=None,
                   help="caption: let a text-guided method be guided by the prompt's text [CLS]")
    g.add_argument("--references", default=None,
                   help="caption: COCO-format reference JSON (default: the test file's own captions)")
    g.add_argument("--metric-tokenizer", choices=("auto", "ptb", "python"), default="auto",
                   help="caption: PTB (Java) or the Python tokenisation before scoring (auto: PTB when Java is present)")
    g.add_argument("--dets", default=None, help="grounding: ALBEF's dets.json with the candidate boxes")
    g.add_argument("--grounding-mode", choices=("itm", "align", "caption"), default="itm",
                   help="grounding: Grad-CAM of the ITM score (ALBEF), zero-shot patch-word alignment, or Grad-CAM "
                        "of a captioner's likelihood of the expression (--checkpoint a caption run)")
    g.add_argument("--grounding-layer", type=int, default=None,
                   help="grounding: 1-based fusion layer for Grad-CAM (default: the 3rd of 6, as ALBEF)")


def caption_options(args) -> dict:
    return dict(prompt=args.prompt, num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length,
                repetition_penalty=args.repetition_penalty, guide=args.guide, references=args.references,
                tokenizer=args.metric_tokenizer)


def run_hf_caption(args) -> int:
    """``eval caption --hf``: a BlipForConditionalGeneration with its processor, patched with the method flags."""
    import torch

    from vlprune.data.caption_formats import load_caption_test, load_references
    from vlprune.patch import patch
    from vlprune.patch.hub import load_hf
    from vlprune.tasks.caption_metrics import caption_scores
    from vlprune.tasks.hf_caption import evaluate_hf_caption
    from vlprune.tasks.hf_vqa import load_processor

    from .method_flags import method_config

    if args.test is None or not Path(args.test).is_file():
        raise FileNotFoundError(f"--hf needs --test, a caption test file (Karpathy format); not found: {args.test}")
    root = Path(args.images) if args.images else Path(args.test).parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root directory not found: {root}")
    entries = load_caption_test(args.test)
    ids = [e["image_id"] for e in entries]
    refs = load_references(args.references, ids) if args.references else {e["image_id"]: e["caption"] for e in entries}
    model = load_hf(args.hf)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    rc = method_config(args)
    if rc is not None:
        patch(model, rc)
    res = evaluate_hf_caption(model, load_processor(args.hf), entries, root, args.batch_size, not args.quiet,
                              prompt=args.prompt, num_beams=args.num_beams, max_length=args.max_length,
                              min_length=args.min_length, repetition_penalty=args.repetition_penalty)
    results = {r["image_id"]: r["caption"] for r in res["results"]}
    metrics, _, used = caption_scores(results, refs, args.metric_tokenizer)
    if args.predictions is not None:
        Path(args.predictions).write_text(json.dumps(res["results"]))
    name = "none" if rc is None else rc.name
    print(f"caption on {args.test} ({res['examples']} images), {type(model).__name__} from {args.hf}, method "
          f"{name if rc is None else rc.to_dict()}")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()) + f" (tokenizer {used})")
    print(f"  {res['seconds_per_image'] * 1000:.1f} ms per image, {res['image_tokens']:.1f} image tokens per decoding "
          f"step, {res['new_tokens_per_image']:.1f} new tokens per image")
    if args.json:
        print(json.dumps({**metrics, "method": name, "method_config": None if rc is None else rc.to_dict(),
                          "examples": res["examples"], "seconds_per_image": res["seconds_per_image"],
                          "image_tokens": res["image_tokens"], "new_tokens_per_image": res["new_tokens_per_image"],
                          "metric_tokenizer": used, "model": args.hf}))
    return 0


def run_grounding(args) -> int:
    """``eval grounding``: a two-stream checkpoint (ITM head), any method at inference."""
    import torch

    from vlprune.data.datasets import check_image_paths
    from vlprune.data.images import DEFAULT_MAX_PIXELS, ImageLoader
    from vlprune.data.tokenizer import TextTokenizer
    from vlprune.models.build import load_pretrained
    from vlprune.tasks.finetune import checkpoint_dir, tokenizer_dir
    from vlprune.tasks.refgrounding import evaluate_grounding, load_grounding

    from .method_flags import image_options, method_config

    if args.hf is not None:
        raise ValueError("eval grounding takes --checkpoint (a two-stream vlprune model), not --hf")
    if args.checkpoint is None:
        raise ValueError("eval grounding needs --checkpoint (a pre-training or retrieval run)")
    ckpt = checkpoint_dir(args.checkpoint)
    run_dir = ckpt.parent if ckpt.name == "model" else ckpt
    test = Path(args.test) if args.test else run_dir / "data" / "grounding_test.json"
    if args.test is None and not test.is_file() and (run_dir / "data" / "scenes.json").is_file():
        from vlprune.data.scenes_refs import write_scenes_refs

        write_scenes_refs(run_dir / "data")
    if not test.is_file():
        raise FileNotFoundError(f"grounding test file not found: {test}")
    entries = load_grounding(test, args.dets)
    rc = method_config(args)
    model = load_pretrained(ckpt, method="saved" if rc is None else rc).eval()
    tdir = tokenizer_dir(ckpt)
    if tdir is None:
        raise FileNotFoundError(f"no tokenizer found with the checkpoint {ckpt}")
    tok = TextTokenizer.from_dir(tdir)
    opts = image_options(args)
    loader = ImageLoader.for_model(model.cfg.vision, Path(args.images) if args.images else test.parent,
                                   opts.get("max_image_pixels", DEFAULT_MAX_PIXELS), opts.get("allow_outside_root", False))
    check_image_paths(entries, loader)
    n_fusion = len(model.fusion.layers)
    if args.grounding_layer is not None and not 1 <= args.grounding_layer <= n_fusion:
        raise ValueError(f"--grounding-layer is a 1-based fusion layer: must be in [1, {n_fusion}] for {ckpt}, got "
                         f"{args.grounding_layer}")
    layer = None if args.grounding_layer is None else args.grounding_layer - 1
    with torch.no_grad():
        res = evaluate_grounding(model, entries, loader, tok, args.batch_size, args.grounding_mode, layer)
    mc = model.method_config
    name = "none" if mc is None else mc.name
    print(f"grounding on {test} ({res['examples']} expressions), method {name if mc is None else mc.to_dict()}, "
          f"mode {args.grounding_mode}")
    print(f"  accuracy {res['accuracy']:.2f} (random box {res['random_accuracy']:.2f}), ground-truth patches still "
          f"kept {res['kept_fraction']:.1f}%, image tokens {res['image_tokens']:.1f}")
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k not in ("hits", "random_hits")}
                         | {"method": name, "method_config": None if mc is None else mc.to_dict(),
                            "mode": args.grounding_mode}))
    return 0
