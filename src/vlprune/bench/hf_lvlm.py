"""``vlprune bench --hf-arch llava-1.5-0.5b | qwen2-vl-2b | ...``: vision-language LLMs at real sizes with random
weights, patched by ``vlprune.patch``: prefill latency, decode tokens/s, KV-cache memory, image tokens kept in the
LLM, prefill FLOPs and the speed-up against the FLOPs-ideal one.

Every configuration runs on the same model and inputs (a batch of prompts [bos, 5 text, N image, text_len text]);
the prefill is ``model(..., use_cache=True, logits_to_keep=1)``, timed interleaved over the configurations
(medians); decode = (generate of T tokens - generate of 1 token) / (T - 1) steps; KV-cache bytes = the prefill's cache.
Random weights give the real shapes and costs, not meaningful answers.
"""

from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..flopcount import flop_counter_mode
from ..patch import get_patch, patch, unpatch
from ..reduce.registry import ReduceConfig
from .throughput import time_interleaved

CLIP_L336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
# name -> (what it is, builder kind, config pieces)
ARCHS: Dict[str, Tuple[str, str, Dict]] = {
    "llava-1.5-0.5b": ("LLaVA-1.5 layout: CLIP ViT-L/14-336 (576 image tokens) + a Qwen2-0.5B-sized Llama decoder",
                       "llava", dict(vision=CLIP_L336, text=dict(model_type="llama", vocab_size=151936, hidden_size=896,
                                     intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                     num_key_value_heads=2, max_position_embeddings=4096))),
    "llava-1.5-7b": ("LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2-7B shape); for a GPU", "llava",
                     dict(vision=CLIP_L336, text=dict(model_type="llama", vocab_size=32064, hidden_size=4096,
                                                      intermediate_size=11008, num_hidden_layers=32,
                                                      num_attention_heads=32, max_position_embeddings=4096))),
    "llava-small": ("a quick check: CLIP ViT-B/16-224 (196 image tokens) + a 4-layer Llama of width 512", "llava",
                    dict(vision=dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16),
                         text=dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                   num_hidden_layers=4, num_attention_heads=8, max_position_embeddings=2048))),
}
LVLM_ARCHS = tuple(ARCHS)
DEFAULT_METHODS = ("fastv_llm", "visionzip")
IMAGE_ID = 31999  # inside every vocabulary above


def build_arch(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> nn.Module:
    """A model of architecture ``name`` with random weights (SDPA attention), built in ``dtype`` on ``device``."""
    import transformers

    if name not in ARCHS:
        raise ValueError(f"unknown LVLM architecture {name!r}; known: {list(ARCHS)}")
    _, kind, parts = ARCHS[name]
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(vision_config=parts["vision"], text_config=parts["text"], image_token_index=IMAGE_ID,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            model = transformers.LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def image_tokens(model: nn.Module) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def example_inputs(model: nn.Module, batch: int, text_len: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Prompts [bos, 5 text, N image, text_len text] (same length, no padding) and random pixels."""
    g = torch.Generator().manual_seed(seed)
    N, vc = image_tokens(model), model.config.vision_config
    text = torch.randint(3, min(1000, model.config.image_token_id), (batch, 5 + text_len), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), text[:, :5],
                     torch.full((batch, N), model.config.image_token_id), text[:, 5:]], 1)
    dev, dt = next(model.parameters()).device, next(model.parameters()).dtype
    px = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g).to(dev, dt)
    return dict(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), pixel_values=px)


def cache_bytes(cache) -> int:
    """Bytes held by a DynamicCache's keys and values (every layer)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.numel() * t.element_size() for l in layers for t in (l.keys, l.values) if t is not None)
    return sum(t.numel() * t.element_size() for t in list(cache.key_cache) + list(cache.value_cache))


def _prefill(model: nn.Module, inputs: Dict) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    return run


def _generate(model: nn.Module, inputs: Dict, new: int) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    return run


def _apply(model: nn.Module, rc: Optional[ReduceConfig]) -> None:
    unpatch(model) if rc is None else patch(model, rc)


def kept_tokens(model: nn.Module, n: int) -> int:
    """Image tokens the LLM's last layer sees in the last call (N when nothing is reduced)."""
    p = get_patch(model)
    if p is None:
        return n
    st = getattr(p, "lvlm", None)
    if st is not None and st.last_kept:
        return int(st.last_kept[-1][1][0].sum())
    return p.last_tokens if p.last_tokens is not None else n


def run_lvlm_bench(model: nn.Module, methods: Sequence[ReduceConfig], batch: int = 1, text_len: int = 40,
                   new_tokens: int = 16, repeats: int = 3, warmup: int = 1, flops_only: bool = False,
                   progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """One row per configuration (unpatched first, then each method), on the same model and inputs."""
    progress = progress or (lambda m: None)
    rows: List[Tuple[str, Optional[ReduceConfig]]] = [("unpatched", None)] + [(_label(rc), rc) for rc in methods]
    for _, rc in rows:  # every configuration must install before anything is timed
        _apply(model, rc)
    unpatch(model)
    N = image_tokens(model)
    one, inputs = example_inputs(model, 1, text_len), example_inputs(model, batch, text_len)
    out = []
    for label, rc in rows:
        _apply(model, rc)
        with flop_counter_mode() as fc:
            _prefill(model, one)()
        res = _prefill(model, inputs)()
        kv = res.cache if "cache" in res else res.past_key_values  # transformers 5 / 4
        out.append({"label": label, "config": None if rc is None else rc.to_dict(), "image_tokens": N,
                    "kept": kept_tokens(model, N), "prefill_gflops": fc.get_total_flops() / 1e9,
                    "kv_mb": cache_bytes(kv) / 2 ** 20, "batch_size": batch, "text_len": text_len,
                    "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                    "threads": torch.get_num_threads()})
        progress(f"{label}: {out[-1]['kept']} image tokens, {out[-1]['prefill_gflops']:.1f} GFLOPs prefill")
    unpatch(model)
    if not flops_only:
        dev = next(model.parameters()).device
        calls = [(lambda rc=rc: _apply(model, rc), _prefill(model, inputs)) for _, rc in rows]
        progress(f"timing the prefill of {len(rows)} configurations interleaved, {repeats} rounds")
        pre = time_interleaved(calls, dev, warmup, repeats)
        calls = [(lambda rc=rc: _apply(model, rc), _generate(model, inputs, n)) for _, rc in rows for n in (1, new_tokens)]
        progress(f"timing generate(1 token) and generate({new_tokens} tokens), {repeats} rounds")
        gen = time_interleaved(calls, dev, warmup, repeats)
        for i, (r, tp) in enumerate(zip(out, pre)):
            g1, gn = statistics.median(gen[2 * i]), statistics.median(gen[2 * i + 1])
            r["prefill_ms"] = statistics.median(tp) * 1e3
            # decode = the extra time of new_tokens - 1 more steps (None when the noise swamps it)
            r["decode_tok_s"] = batch * (new_tokens - 1) / (gn - g1) if gn > g1 else None
        unpatch(model)
    base = out[0]
    for r in out:
        r["ideal_speedup"] = base["prefill_gflops"] / r["prefill_gflops"]
        r["speedup"] = base["prefill_ms"] / r["prefill_ms"] if "prefill_ms" in r else None
        r["speedup_ratio"] = r["speedup"] / r["ideal_speedup"] if r["speedup"] else None
        r["kv_ratio"] = r["kv_mb"] / base["kv_mb"]
        try:
            r["load_avg"] = round(os.getloadavg()[0], 2)
        except (OSError, AttributeError):
            r["load_avg"] = None
    return out


def _label(rc: ReduceConfig) -> str:
    keep = "" if rc.keep is None else f" keep {rc.keep}"
    layers = "" if rc.layers is None else f" layers {','.join(map(str, rc.layers))}"
    return f"{rc.name}{keep}{layers}"


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_lvlm_table(rows: Sequence[Dict]) -> str:
    head = ("| configuration | image tokens in LLM | prefill GFLOPs | prefill ms | speed-up | FLOPs-ideal | ratio "
            "| decode tok/s | KV cache MB | KV ratio |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['label']} | {r['kept']} / {r['image_tokens']} | {r['prefill_gflops']:.1f} | "
                     f"{_f(r.get('prefill_ms'), '.0f')} | {_f(r['speedup'], '.2f')} | {r['ideal_speedup']:.2f} | "
                     f"{_f(r['speedup_ratio'], '.2f')} | {_f(r.get('decode_tok_s'), '.1f')} | {r['kv_mb']:.1f} | "
                     f"{r['kv_ratio']:.2f} |")
    return "\n".join(lines)


def run_command(args, methods: Sequence[ReduceConfig], progress: Callable[[str], None]) -> int:
    """``vlprune bench --hf-arch <LVLM>`` (called from ``commands/bench.py``)."""
    import json

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision or "bf16"]
    progress(f"building {args.hf_arch} ({ARCHS[args.hf_arch][0]}), random weights, {dtype}")
    model = build_arch(args.hf_arch, dtype, args.device)
    methods = list(methods) or [ReduceConfig(m) for m in DEFAULT_METHODS]
    rows = run_lvlm_bench(model, [m for m in methods if m.name != "none"], args.batch_size or 1, args.text_len,
                          args.new_tokens, args.repeats, args.warmup, args.flops_only, progress)
    if getattr(args, "json_out", None):
        with open(args.json_out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_lvlm_table(rows))
        print(f"({args.hf_arch}, {rows[0]['dtype']}, batch {rows[0]['batch_size']}, text {args.text_len} tokens, "
              f"{rows[0]['threads']} threads, load average {rows[0]['load_avg']}, device {args.device})")
    return 0


__all__ = ["ARCHS", "LVLM_ARCHS", "build_arch", "example_inputs", "run_lvlm_bench", "format_lvlm_table", "run_command"]
