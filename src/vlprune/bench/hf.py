"""Benchmark a Hugging Face model patched by ``vlprune.patch`` against the same model unpatched, in one run.

    vlprune bench --hf-arch blip-base --method trips --method evit --method tome
    vlprune bench --hf Salesforce/blip-itm-base-coco --method trips --keep 0.5

``--hf-arch NAME`` builds the real architecture from the class's default config with random weights (nothing is
downloaded); ``--hf DIR_OR_ID`` loads a saved model (``from_pretrained``; a hub id needs the internet). The rows:
``unpatched`` (the model as transformers runs it), ``patched none`` (vlprune's SDPA layers, no reduction: what the
layer swap alone gives, e.g. BLIP's eager vision attention replaced) and one row per method. Timing is interleaved
(``bench.throughput.time_interleaved``): each round times every row once, in rotating order, and the median is
taken. FLOPs are counted by running one batch under ``flopcount.flop_counter_mode`` (matrix products, convolutions
and attention), per example; ``ideal`` = GFLOPs(unpatched) / GFLOPs(row) and ``ratio`` = speed-up / ideal.
Text-guided methods on BLIP include the extra unimodal text-encoder pass that computes their guide.
"""

from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flopcount import flop_counter_mode
from ..patch import FAMILIES, get_patch, guidance, patch, unpatch
from ..patch.hub import load_hf
from ..reduce.registry import ReduceConfig, get_spec
from .throughput import calls_bar, time_interleaved

# --hf-arch name -> (transformers class, config class, config overrides on top of its defaults)
ARCHS: Dict[str, Tuple[str, str, Dict]] = {
    "blip-base": ("BlipForImageTextRetrieval", "BlipConfig", {}),  # ViT-B/16 at 384 px, BERT-base text
    "clip-b16": ("CLIPModel", "CLIPConfig", {"vision_config": {"patch_size": 16}}),  # ViT-B/16 at 224 px
    "vilt-b32": ("ViltForQuestionAnswering", "ViltConfig", {"num_labels": 3129}),  # ViT-B/32 at 384 px
    "bridgetower-base": ("BridgeTowerForImageAndTextRetrieval", "BridgeTowerConfig", {}),  # ViT-B/16 at 288, 6 cross
}


def build_arch(name: str) -> nn.Module:
    """The real architecture ``name`` with random weights from its class's default config."""
    import transformers

    if name not in ARCHS:
        raise ValueError(f"unknown --hf-arch {name!r}; valid: {sorted(ARCHS)}")
    cls, cfg_cls, over = ARCHS[name]
    torch.manual_seed(0)
    return getattr(transformers, cls)(getattr(transformers, cfg_cls)(**over)).eval()


def image_size(model: nn.Module) -> int:
    c = model.config
    return (c.vision_config if hasattr(c, "vision_config") else c).image_size


def _max_text(model: nn.Module) -> int:
    c = model.config
    return getattr(c.text_config if hasattr(c, "text_config") else c, "max_position_embeddings", 10**9)


def example_call(model: nn.Module, batch: int, text_len: int, seed: int = 0) -> Callable[[], object]:
    """One forward of the model's usual kind on random inputs: image-text pairs (ITM, VQA, CLIP scores, ViLT),
    images alone (CLIPVisionModel), teacher-forced captions (BLIP captioning)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    S = image_size(model)
    px = torch.randn(batch, 3, S, S, generator=g).to(dev)
    c = model.config
    tc = c.text_config if hasattr(c, "text_config") else c
    vocab = tc.vocab_size
    text_len = min(text_len, _max_text(model))
    ids = torch.randint(5, vocab, (batch, text_len), generator=g).to(dev)
    mask = torch.ones_like(ids)
    name = type(model).__name__
    kw: Dict = dict(pixel_values=px)
    if name != "CLIPVisionModel":
        kw.update(input_ids=ids, attention_mask=mask)
    if name == "BlipForQuestionAnswering":
        kw["decoder_input_ids"] = ids
    width = (c.vision_config if hasattr(c, "vision_config") else c).hidden_size
    guide = torch.randn(batch, width, generator=g).to(dev)

    def call():
        p = get_patch(model)
        with torch.inference_mode():
            if p is not None and p.spec.text_guided and p.binding.family == "clip":
                with guidance(model, guide):  # CLIP: the caller's guide (here random)
                    return model(**kw)
            return model(**kw)

    return call


def _rows(methods: Sequence[ReduceConfig], family: str) -> List[Tuple[str, Optional[ReduceConfig]]]:
    rows: List[Tuple[str, Optional[ReduceConfig]]] = [("unpatched", None), ("patched none", ReduceConfig("none"))]
    chosen = [m for m in methods if m.name != "none"] or [ReduceConfig(n) for n in FAMILIES.get(family).bench]
    for rc in chosen:
        label = rc.name + "".join(f" {k}={v}" for k, v in (("layers", rc.layers), ("keep", rc.keep)) if v is not None)
        label += "".join(f" {k}={v}" for k, v in rc.options.items())
        rows.append((label, rc))
    return rows


def _apply(model: nn.Module, rc: Optional[ReduceConfig]) -> None:
    if rc is None:
        unpatch(model)
    else:
        patch(model, rc)


def run_hf_bench(model: nn.Module, methods: Sequence[ReduceConfig], batch: int = 8, text_len: int = 40,
                 repeats: int = 5, warmup: int = 1, flops_only: bool = False,
                 progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """One row per configuration (unpatched, patched none, each method), measured on the same model and inputs."""
    progress = progress or (lambda m: None)
    for rc in methods:
        get_spec(rc.name)
    family = (patch(model, "none"), get_patch(model).binding.family)[1]
    unpatch(model)
    rows = _rows(methods, family)
    for _, rc in rows:  # check every configuration on this model before timing anything
        _apply(model, rc)
    unpatch(model)
    dev = next(model.parameters()).device
    out = []
    for label, rc in rows:
        _apply(model, rc)
        with flop_counter_mode() as fc:
            example_call(model, 1, text_len)()
        p = get_patch(model)
        out.append({"label": label, "config": None if rc is None else rc.to_dict(), "gflops": fc.get_total_flops() / 1e9,
                    "tokens": p.last_tokens if p is not None else None, "batch_size": batch,
                    "text_len": min(text_len, _max_text(model)),
                    "threads": torch.get_num_threads()})
        progress(f"{label}: {out[-1]['gflops']:.2f} GFLOPs per example")
    unpatch(model)
    if not flops_only:
        call = example_call(model, batch, text_len)
        progress(f"timing {len(rows)} configurations interleaved, batch {batch}, {repeats} rounds")
        with calls_bar(progress, (warmup + repeats) * len(rows), "throughput") as tick:
            times = time_interleaved([(lambda rc=rc: _apply(model, rc), call) for _, rc in rows], dev, warmup, repeats,
                                     tick=tick)
        for r, t in zip(out, times):
            r["latency_ms"] = statistics.median(t) * 1e3
            r["throughput"] = batch / statistics.median(t)
        unpatch(model)
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load = None
    base, sdpa = out[0], out[1]
    for r in out:
        r["load_avg"] = load
        r["ideal_speedup"] = base["gflops"] / r["gflops"]
        thr = r.get("throughput")
        r["speedup"] = thr / base["throughput"] if thr else None
        r["speedup_vs_sdpa"] = thr / sdpa["throughput"] if thr else None
        r["speedup_ratio"] = r["speedup"] / r["ideal_speedup"] if r["speedup"] else None
    return out


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def format_hf_table(rows: Sequence[Dict]) -> str:
    cols = [("configuration", lambda r: r["label"], "<"), ("GFLOPs/ex", lambda r: _f(r["gflops"], ".2f"), ">"),
            ("img tokens out", lambda r: _f(r["tokens"], "d"), ">"), ("ex/s", lambda r: _f(r.get("throughput"), ".2f"), ">"),
            ("speed-up", lambda r: _f(r["speedup"], ".2f"), ">"),
            ("vs patched none", lambda r: _f(r["speedup_vs_sdpa"], ".2f"), ">"),
            ("ideal", lambda r: _f(r["ideal_speedup"], ".2f"), ">"), ("ratio", lambda r: _f(r["speedup_ratio"], ".2f"), ">")]
    cells = [[c[0] for c in cols]] + [[fn(r) for _, fn, _ in cols] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cols))]
    lines = ["  ".join(format(c, f"{a}{w}") for c, w, (_, _, a) in zip(row, widths, cols)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_command(args, methods: Sequence[ReduceConfig], progress: Callable[[str], None]) -> int:
    """``vlprune bench --hf ... | --hf-arch ...`` (called from ``commands/bench.py``)."""
    import json

    if args.hf_arch:
        progress(f"building {args.hf_arch} ({ARCHS.get(args.hf_arch, ('?',))[0]}, random weights, default config)")
        model = build_arch(args.hf_arch)
    else:
        progress(f"loading {args.hf}")
        model = load_hf(args.hf)
    model.to(args.device)
    batch = args.batch_size or (8 if args.device == "cpu" else 32)
    rows = run_hf_bench(model, methods, batch, args.text_len, args.repeats, args.warmup, args.flops_only, progress)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_hf_table(rows))
        timing = "FLOPs only" if args.flops_only else f"interleaved medians of {args.repeats} rounds, batch {batch}"
        print(f"({timing}; text length {rows[0]['text_len']}, {rows[0]['threads']} threads, load average "
              f"{rows[0]['load_avg']})")
    return 0


__all__ = ["ARCHS", "build_arch", "example_call", "run_hf_bench", "format_hf_table", "run_command"]
