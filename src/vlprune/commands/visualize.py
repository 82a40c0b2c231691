"""``vlprune visualize``: which patches a method keeps for one image and one text, at every reduction layer.

    vlprune visualize --checkpoint runs/demo/pretrain --image cat.jpg --text "what colour is the cat?" \\
        --method trips --layers 2,4 --keep 0.5 --out overlay.png

The checkpoint is a ``vlprune train`` run directory or a directory written by ``vlprune.save_pretrained``; the
run's tokenizer encodes the text. Without ``--method`` the method the model was saved with is used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Tuple

from .method_flags import add_image_flags, add_method_flags, image_options, method_config

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("visualize", help="draw the kept / fused / dropped patches of an image at every reduction")
    p.add_argument("--checkpoint", required=True, help="run directory (config.json + model.safetensors + tokenizer)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--text", required=True, help="the caption or question that guides the selection")
    add_method_flags(p, method_help="method to apply instead of the saved one")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_image_flags(p, skip=False)
    p.add_argument("--heat", choices=("itm", "align"), default=None,
                   help="draw the grounding heat of --text instead (Grad-CAM of the ITM score, or patch-word alignment; "
                   "docs/caption_grounding.md), with any method")
    p.set_defaults(run=run)


def _load_tokenizer(ckpt: Path, text_cfg) -> Callable[[str, int], Tuple]:
    """``encode(text, max_len) -> (ids (1, L), mask (1, L))`` with the checkpoint's tokenizer: the one its run
    saved (``vlprune.tasks.finetune.tokenizer_dir``) or a ``tokenizer.json`` / ``vocab.txt`` next to the weights."""
    from vlprune.data.tokenizer import TextTokenizer
    from vlprune.models.build import tokenizer_dir

    d = tokenizer_dir(ckpt)
    if d is None and ((ckpt / "tokenizer.json").is_file() or (ckpt / "vocab.txt").is_file()):
        d = ckpt
    if d is None:
        raise FileNotFoundError(
            f"no tokenizer for {ckpt}: visualize needs the run's tokenizer (tokenizer.json or vocab.txt in "
            f"{ckpt}, {ckpt / 'tokenizer'} or {ckpt.parent / 'tokenizer'}) to encode --text")
    tok = TextTokenizer.from_dir(d)
    tok.check_model(text_cfg)
    return lambda text, max_len: tok.encode([text], max_len)


def _load_image(path: Path, cfg, max_pixels: int):
    """(1, C, S, S) normalised model input and the (S, S, 3) display image in [0, 1]. The file is read as the
    datasets read theirs (``vlprune.data.images.open_image``: any mode to RGB, bad files and images over
    ``max_pixels`` refused naming the path); ``--image`` names it directly, so no image root applies."""
    import numpy as np
    import torch
    from PIL import Image

    from vlprune.data.images import open_image

    img = open_image(path, max_pixels).resize((cfg.image_size, cfg.image_size), Image.BICUBIC)
    disp = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(disp).permute(2, 0, 1)
    mean = torch.tensor(cfg.image_mean)[:, None, None]
    std = torch.tensor(cfg.image_std)[:, None, None]
    return ((x - mean) / std)[None], disp


def run(args) -> int:
    import torch

    import vlprune
    from vlprune.data.images import DEFAULT_MAX_PIXELS
    from vlprune.errors import CLIError
    from vlprune.viz.overlay import patch_status, save_overlay, trace_records

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    from vlprune.models.build import checkpoint_dir

    ckpt = checkpoint_dir(args.checkpoint)  # a run directory (its model/) or a saved model directory
    rc = method_config(args)
    model = vlprune.load_pretrained(ckpt) if rc is None else vlprune.load_pretrained(ckpt, method=rc)
    model.eval()
    if getattr(args, "heat", None):  # the grounding heat (docs/caption_grounding.md)

        return visualize_heat(args, model, ckpt, out)
    if not model.reducers():
        raise CLIError("the model has no reduction method installed, so there is nothing to show; pass --method")
    encode = _load_tokenizer(ckpt, model.cfg.text)
    ids, mask = encode(args.text, model.cfg.text.max_len)
    images, disp = _load_image(Path(args.image), model.cfg.vision,
                               image_options(args).get("max_image_pixels", DEFAULT_MAX_PIXELS))
    with torch.no_grad():
        output = model(images, ids, mask, trace=True)
    panels = patch_status(trace_records(model, output))
    rc = model.method_config
    title = f"{rc.name if rc else 'method'}: \"{args.text}\""
    n = save_overlay(disp, panels, out, title=title)
    print(f"wrote {out} ({n - 1} reduction layer(s))")
    return 0


def visualize_heat(args, model, ckpt, out) -> int:
    """``visualize --heat``: the grounding heat of ``--text`` on ``--image`` under the model's method."""
    from vlprune.data.images import DEFAULT_MAX_PIXELS
    from vlprune.tasks.refgrounding import alignment_heat, gradcam_heat, heat_to_grid
    from vlprune.viz.overlay import save_heat_overlay

    from .method_flags import image_options

    encode = _load_tokenizer(ckpt, model.cfg.text)
    ids, mask = encode(args.text, model.cfg.text.max_len)
    images, disp = _load_image(Path(args.image), model.cfg.vision,
                               image_options(args).get("max_image_pixels", DEFAULT_MAX_PIXELS))
    heat, image = (gradcam_heat if args.heat == "itm" else alignment_heat)(model, images, ids, mask)
    grid = int(round(model.cfg.vision.num_patches ** 0.5))
    g = heat_to_grid(heat[0].float(), None if image.source is None else image.source[0], grid)
    rc = model.method_config
    save_heat_overlay(disp, g, out, title=f"{rc.name if rc else 'no reduction'} ({args.heat}): \"{args.text}\"")
    print(f"wrote {out} (grounding heat, {image.num_tokens} image tokens)")
    return 0
