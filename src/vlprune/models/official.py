"""Load the checkpoints the papers released: ``load_official(path, kind)`` for ALBEF, ELIP, LAPS and PuMer's ViLT.

    model, report = vlprune.load_official("ALBEF.pth", kind="albef")                 # pre-trained ALBEF
    model, report = vlprune.load_official("mscoco.pth", kind="albef", image_size=384)   # retrieval, fine-tuned
    model, report = vlprune.load_official("model_best.pth", kind="laps")               # LAPS (ViT backbone)
    model, report = vlprune.load_official("vilt_vqa_pumer/", kind="pumer-vilt")        # PuMer: dir or file
    print(report.table())

Files are read with ``torch.load(weights_only=True)`` only (``.safetensors`` with safetensors); the usual wrappers
``{"model": ...}`` / ``{"state_dict": ...}`` and DDP's ``module.`` prefix are unwrapped. The key maps live in
``official_maps``. Every key of the checkpoint is either used (``report.loaded``: our key, theirs, how) or
ignored with its reason (``report.ignored``); every parameter of ours is either loaded or named in
``report.initialised`` with its reason. Keys the map does not know (``unknown``), keys it expected and did not
find (``missing``) and shape mismatches raise one ``ValueError`` naming them, unless ``strict=False`` (then they
are only reported and the affected parameters keep their initialisation). Position embeddings of another grid
are interpolated (bicubic, [CLS] row kept), as the official fine-tuning code does for 384 px.

Attention heads are not stored in a state dict: ``heads`` (default width / 64, the base models' 12) sets them.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..config import ModelConfig, TextConfig, VisionConfig
from ..reduce.registry import ReduceConfig
from . import official_maps as M
from .official_report import LoadReport, short as _short
from .build import build_model
from .heads import add_task_head
from .vit import interpolate_pos_embed

log = logging.getLogger(__name__)

FORMATS = ("albef", "elip", "laps", "pumer-vilt")
HALF = (0.5, 0.5, 0.5)  # ViLT's and the Hugging Face in21k ViT's normalisation (ALBEF's is CLIP's, our default)


# -- reading ---------------------------------------------------------------------------------------------------------
def read_official(path: Union[str, Path]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """(state dict, the other entries of the file: e.g. ALBEF's "config", LAPS's "opt", a directory's config.json)."""
    p = Path(path)
    extra: Dict[str, Any] = {}
    if p.is_dir():
        if (p / "config.json").is_file():
            extra["config"] = json.loads((p / "config.json").read_text())
        files = sorted(p.glob("*.safetensors")) or [f for f in (p / "pytorch_model.bin",) if f.is_file()]
        if not files:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in the checkpoint directory {p}")
        p = files[0]
    elif not p.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(p))
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):  # LAPS stores its options as a Namespace
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise ValueError(f"cannot read {p} with torch.load(weights_only=True) (only tensors and plain containers "
                             f"are accepted): {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict", "module"):
            if isinstance(obj.get(wrapper), dict):
                extra.update({k: v for k, v in obj.items() if k != wrapper})
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{p} holds no state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{p}: entries that are not tensors: {_short(bad)} (expected a state dict)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj), extra


# -- configurations from the checkpoint's shapes ---------------------------------------------------------------
def _heads(width: int, heads: Optional[int]) -> int:
    h = heads if heads is not None else max(1, width // 64)
    if width % h:
        raise ValueError(f"width {width} is not divisible by heads={h}; pass heads= (attention heads are not stored)")
    return h


def _vision(s, prefix, pos_key, patch_key, fc1_key, image_size, heads, **kw) -> VisionConfig:
    D = s[pos_key].shape[-1]
    patch = s[patch_key].shape[-1]
    grid = M.square_grid(s[pos_key].shape[-2] - 1, pos_key)
    n = M.count_layers(s, prefix)
    return VisionConfig(image_size=image_size or grid * patch, patch_size=patch, width=D, layers=n,
                        heads=_heads(D, heads), mlp_dim=s[fc1_key].shape[0], **kw)


def _text(s, e, layers, heads, fc1_key, **kw) -> TextConfig:
    w = s[e + "word_embeddings.weight"]
    return TextConfig(vocab_size=w.shape[0], width=w.shape[1], layers=layers, heads=_heads(w.shape[1], heads),
                      mlp_dim=s[fc1_key].shape[0], max_len=s[e + "position_embeddings.weight"].shape[0],
                      type_vocab_size=s[e + "token_type_embeddings.weight"].shape[0], **kw)


def albef_setup(s, extra, image_size, heads, elip: bool):
    lay = M.albef_layout(s)
    v = _vision(s, "visual_encoder.blocks.", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
                "visual_encoder.blocks.0.mlp.fc1.weight", image_size, heads, ln_eps=1e-6)
    b = lay.bert
    t = _text(s, b + "embeddings.", lay.text_layers, heads, b + "encoder.layer.0.intermediate.dense.weight")
    embed = s["vision_proj.weight"].shape[0] if "vision_proj.weight" in s else 256
    cfg = ModelConfig(arch="albef", vision=v, text=t, fusion_layers=lay.fusion_layers, embed_dim=embed,
                      queue_size=s["image_queue"].shape[1] if lay.queue else 0, use_momentum=lay.momentum)
    method = None
    notes = []
    if elip:
        prune = (extra.get("config") or {}).get("img_prune") if isinstance(extra.get("config"), dict) else None
        if prune:  # ELIP's config: 0-based begin layers, layers per block, keep ratios of N
            method = ReduceConfig("elip", layers=tuple(int(x) + 1 for x in prune["begin_layer"]),
                                  keep=tuple(float(x) for x in prune["keep_ratio"]),
                                  options={"spans": [int(x) for x in prune["num_act_layers"]]})
            notes.append("ELIP: pruning schedule from the checkpoint's config (img_prune, 0-based begin layers + 1)")
        elif lay.variant == "pretrain":
            method = ReduceConfig("elip")
            notes.append("ELIP: no img_prune in the checkpoint's config; ELIP's defaults (blocks at 3, 5, 11)")
        else:  # ELIP's fine-tuning and evaluation code runs the ViT unpruned
            notes.append(f"ELIP {lay.variant} checkpoint without img_prune in its config: loaded unpruned, as ELIP's "
                         "fine-tuning and evaluation run it (pass method= / --method elip to prune)")
        if method is not None:
            notes.append("ELIP prunes in pre-training; its fine-tuning code runs the ViT unpruned (method=None does)")
    km = M.albef_map(lay)
    km.notes[:0] = notes
    heads_ = {"ve": ("albef", 3)} if lay.variant == "ve" else {}
    return cfg, method, km, lay.variant, heads_


def laps_setup(s, extra, image_size, heads):
    if any(k.startswith(M.LAPS_VIT + "encoder.layers.") for k in s):
        raise ValueError("this LAPS checkpoint has a Swin image encoder; only LAPS's ViT variant (--vit_type vit) loads")
    if not any(k.startswith(M.LAPS_VIT) for k in s) or "cross_net.aggr_net.scale" not in s:
        raise ValueError(f"not a LAPS state dict: no '{M.LAPS_VIT}*' or 'cross_net.aggr_net.*' keys (is --format right?)")
    v = _vision(s, M.LAPS_VIT + "encoder.layer.", M.LAPS_VIT + "embeddings.position_embeddings",
                M.LAPS_VIT + "embeddings.patch_embeddings.projection.weight",
                M.LAPS_VIT + "encoder.layer.0.intermediate.dense.weight", image_size, heads, ln_eps=1e-12,
                image_mean=HALF, image_std=HALF)
    nt = M.count_layers(s, M.LAPS_BERT + "encoder.layer.")
    t = _text(s, M.LAPS_BERT + "embeddings.", nt, heads, M.LAPS_BERT + "encoder.layer.0.intermediate.dense.weight")
    dim = s["img_enc.vision_proj.weight"].shape[0]
    cfg = ModelConfig(arch="albef", vision=v, text=t, fusion_layers=1, embed_dim=dim)
    opt = extra.get("opt")
    rho, lam = float(getattr(opt, "sparse_ratio", 0.5)), float(getattr(opt, "aggr_ratio", 0.4))
    n_c = s["cross_net.aggr_net.weight.3.weight"].shape[0]
    km = M.laps_map(v.layers, nt)
    if opt is None:
        km.notes.append(f"LAPS: no 'opt' in the checkpoint; sparse_ratio {rho}, aggr_ratio {lam} assumed "
                        f"(the aggregation makes {n_c} tokens)")
    method = ReduceConfig("laps", keep=rho, options={"official": True, "lam": lam, "dim": dim})
    return cfg, method, km, "retrieval", {}


def pumer_setup(s, extra, image_size, heads, keep):
    prefix = "vilt."
    if not any(k.startswith(prefix + "transformer.blocks.") for k in s):
        raise ValueError("not a PuMer/ViLT state dict: no 'vilt.transformer.blocks.*' keys (is --format right?)")
    conf = extra.get("config") or {}
    if conf.get("prune_method", "mlp_states") != "mlp_states" or conf.get("ib_kl"):
        raise ValueError(f"PuMer pruners of prune_method={conf.get('prune_method')!r}, ib_kl={conf.get('ib_kl')!r} "
                         "are not TiP's; only prune_method='mlp_states' without ib_kl maps")
    if conf.get("merge_ratio") or conf.get("reduce_layers"):
        raise ValueError("this PuMer model also merges tokens (merge_ratio / reduce_layers); vlprune loads pruning-only models")
    tp = prefix + "transformer."
    v = _vision(s, tp + "blocks.", tp + "pos_embed", tp + "patch_embed.proj.weight", tp + "blocks.0.mlp.fc1.weight",
                image_size, heads, ln_eps=1e-6, image_mean=HALF, image_std=HALF)
    e = prefix + "text_embeddings."
    w = s[e + "word_embeddings.weight"]
    t = TextConfig(vocab_size=w.shape[0], width=w.shape[1], layers=0, heads=v.heads, mlp_dim=v.mlp_dim,
                   max_len=s[e + "position_embeddings.weight"].shape[0],
                   type_vocab_size=s[e + "token_type_embeddings.weight"].shape[0])
    cfg = ModelConfig(arch="vilt", vision=v, text=t, fusion_layers=0)
    pat = re.compile(re.escape(prefix) + r"token_pruner\.token_predictors\.(\d+)\.")
    layers = sorted({int(m.group(1)) for k in s for m in [pat.match(k)] if m})
    contrast = any(".token_pruner.text_projections." in k for k in s)
    method, notes = None, []
    if layers:
        r = keep if keep is not None else conf.get("keep_ratio")
        if r is None:
            r = 0.5
            notes.append("PuMer: keep_ratio not known (no config.json); 0.5 used (pass keep=)")
        proj = s[f"{prefix}token_pruner.text_projections.{layers[0]}.weight"].shape[0] if contrast else 192
        method = ReduceConfig("tip", layers=tuple(li + 1 for li in layers), keep=float(r),
                              options={"placement": "post_mlp", "count": "pumer", "proj_dim": proj})
    names = {"vqa": "vqa_classifier", "nlvr2": "nlvr2_classifier", "ve": "ve_classifier"}
    heads_ = {task: ("vilt", s[f"{n}.3.weight"].shape[0]) for task, n in names.items() if f"{n}.3.weight" in s}
    km = M.pumer_map(v.layers, layers, {t_: names[t_] for t_ in heads_}, contrast, "itm_score.fc.weight" in s,
                     "mlm_score.bias" in s, prefix)
    km.notes[:0] = notes
    if "nlvr2" in heads_ and t.type_vocab_size:
        km.notes.append("NLVR2: PuMer gives the second image modality type 2; vlprune gives both images type 1")
    variant = next(iter(heads_), "pretrain" if "mlm_score.bias" in s else "retrieval")
    return cfg, method, km, variant, heads_


# -- applying a key map ----------------------------------------------------------------------------------------------
def _convert(rule: M.Rule, srcs: List[Tensor]) -> Tuple[Tensor, str]:
    if rule.op == "cat":
        return torch.cat(srcs, dim=0), "concatenated"
    if rule.op == "fold":
        return srcs[0] * srcs[1].reshape(-1)[0], "aggregation scale folded in"
    return srcs[0], "copied"


def apply_map(model: nn.Module, state: Dict[str, Tensor], km: M.KeyMap, report: LoadReport) -> Dict[str, Tensor]:
    """Our state dict for ``model`` from ``state`` by ``km``; fills ``report``. Does not load it."""
    own = model.state_dict()
    target: Dict[str, Tensor] = {}
    used = set()
    for rule in km.rules:
        srcs = [state.get(t) for t in rule.theirs]
        if any(x is None for x in srcs):
            report.missing += [(t, rule.ours) for t, x in zip(rule.theirs, srcs) if x is None]
            continue
        used.update(rule.theirs)
        v, how = _convert(rule, srcs)
        if rule.ours not in own:
            report.mismatched.append(f"{rule.ours} <- {', '.join(rule.theirs)}: the model has no such parameter")
            continue
        if rule.ours.endswith("pos_embed") and v.shape != own[rule.ours].shape and v.shape[-1] == own[rule.ours].shape[-1]:
            grid = M.square_grid(own[rule.ours].shape[1] - 1, rule.ours)
            how += f", interpolated {v.shape[1] - 1} -> {grid * grid} positions"
            v = interpolate_pos_embed(v, grid)
        if v.shape != own[rule.ours].shape:
            report.mismatched.append(f"{rule.ours} <- {', '.join(rule.theirs)}: checkpoint {tuple(v.shape)} vs model "
                                     f"{tuple(own[rule.ours].shape)}")
            continue
        target[rule.ours] = v.to(own[rule.ours].dtype)
        report.loaded.append((rule.ours, ", ".join(rule.theirs), how))
    for k in state:
        if k in used:
            continue
        why = next((i.why for i in km.ignore if re.match(i.pattern, k)), None)
        if why is None:
            report.unknown.append(k)
        else:
            report.ignored.append((k, why))
    for k in own:
        if k in target:
            continue
        fresh = next((f for f in km.fresh if k.startswith(f.prefix)), None)
        online = k[len("momentum_encoders."):] if k.startswith("momentum_encoders.") else None
        if fresh is None and (".reducer." in k or k.startswith("laps.")):
            report.initialised.append((k, "a parameter of the installed method that the checkpoint does not have"))
        elif fresh is not None and fresh.from_online and online in own:
            target[k] = target.get(online, own[online])
            report.initialised.append((k, f"{fresh.why}; a copy of the online weights"))
        elif fresh is not None:
            report.initialised.append((k, fresh.why))
        elif not any(o == k for _, o in report.missing) and not any(m.startswith(k + " ") for m in report.mismatched):
            report.missing.append(("(no key of the checkpoint maps here)", k))
    report.notes += km.notes
    return target


def _tied_note(state, report: LoadReport, decoder: str, words: str) -> None:
    d, w = state.get(decoder), state.get(words)
    if d is not None and w is not None and (d.shape != w.shape or not torch.equal(d, w)):
        report.notes.append(f"{decoder} differs from {words}; vlprune's MLM head uses the word embeddings")


def load_official(
    path: Union[str, Path],
    kind: str,
    method: Any = "auto",
    image_size: Optional[int] = None,
    heads: Optional[int] = None,
    keep: Optional[float] = None,
    strict: bool = True,
) -> Tuple[nn.Module, LoadReport]:
    """A vlprune model with the weights of an official checkpoint, and the report of every key.

    kind: "albef" (pre-trained, retrieval, VQA, NLVR2 or SNLI-VE checkpoints: the variant is recognised from the
    keys), "elip" (ELIP's ALBEF), "laps" (LAPS with a ViT backbone) or "pumer-vilt" (PuMer's ViLT with its pruners;
    a directory with config.json, or the weights file). method: "auto" (albef: none; elip: ELIP with the
    checkpoint's schedule, or ELIP's defaults for a pre-trained checkpoint, none for a fine-tuned one without a
    schedule; laps: LAPS official=True with its ratios; pumer-vilt: TiP at PuMer's layers with
    placement="post_mlp", count="pumer"), or any method to install instead (None: no reduction).
    image_size: run at another resolution (position embeddings interpolated). keep: PuMer's keep ratio when the
    checkpoint has no config.json.
    """
    if kind not in FORMATS:
        raise ValueError(f"unknown official checkpoint format {kind!r}; valid: {list(FORMATS)}")
    state, extra = read_official(path)
    if kind in ("albef", "elip"):
        cfg, auto, km, variant, heads_ = albef_setup(state, extra, image_size, heads, kind == "elip")
    elif kind == "laps":
        cfg, auto, km, variant, heads_ = laps_setup(state, extra, image_size, heads)
    else:
        cfg, auto, km, variant, heads_ = pumer_setup(state, extra, image_size, heads, keep)
    chosen = auto if isinstance(method, str) and method == "auto" else method
    model = build_model(cfg, chosen)
    for task, (style, n) in heads_.items():
        add_task_head(model, task, n, style)
    report = LoadReport(kind, variant, str(path))
    target = apply_map(model, state, km, report)
    if kind in ("albef", "elip") and variant == "pretrain":
        _tied_note(state, report, "text_encoder.cls.predictions.decoder.weight",
                   "text_encoder.bert.embeddings.word_embeddings.weight")
    if kind == "pumer-vilt":
        _tied_note(state, report, "mlm_score.decoder.weight", "vilt.text_embeddings.word_embeddings.weight")
    if not report.ok and strict:
        raise ValueError(f"official {kind} checkpoint {path} does not fit: {report.problems()} "
                         "(strict=False loads what maps and reports the rest)")
    merged = {**model.state_dict(), **target}
    model.load_state_dict(merged, strict=True)
    rc = getattr(model, "method_config", None)
    report.method = None if rc is None else rc.to_dict()
    log.info("loaded %s checkpoint %s (%s): %d tensors, %d ignored, %d initialised", kind, path, variant,
             len(report.loaded), len(report.ignored), len(report.initialised))
    return model, report


# -- the other way: our weights under the official names (tests, exports) -----------------------------------------
def to_official(model: nn.Module, kind: str) -> Dict[str, Tensor]:
    """Our model's weights under the official names of ``kind`` ("albef": the retrieval layout; "laps";
    "pumer-vilt"), the inverse of the forward map (LAPS's aggregation scale is written as 1)."""
    own = model.state_dict()
    c = model.cfg
    if kind in ("albef", "elip"):
        lay = M.AlbefLayout("retrieval", "text_encoder.", c.vision.layers, c.text.layers, c.fusion_layers,
                            c.use_momentum, c.queue_size > 0, c.queue_size > 0)
        km = M.albef_map(lay)
    elif kind == "laps":
        km = M.laps_map(c.vision.layers, c.text.layers)
    elif kind == "pumer-vilt":
        rc = model.method_config
        layers = [i - 1 for i in rc.layers] if rc is not None and rc.name == "tip" else []
        km = M.pumer_map(c.vision.layers, layers, {t: f"{t}_classifier" for t in model.task_heads}, bool(layers), mlm=False)
    else:
        raise ValueError(f"unknown official checkpoint format {kind!r}; valid: {list(FORMATS)}")
    out: Dict[str, Tensor] = {}
    for rule in km.rules:
        if rule.ours not in own:
            continue
        v = own[rule.ours]
        if rule.op == "cat":
            for t, part in zip(rule.theirs, v.chunk(len(rule.theirs), dim=0)):
                out[t] = part.clone()
        elif rule.op == "fold":
            out[rule.theirs[0]] = v.clone()
            out[rule.theirs[1]] = torch.ones(1, 1, 1, dtype=v.dtype)
        else:
            out[rule.theirs[0]] = v.clone()
    return out


__all__ = ["FORMATS", "LoadReport", "load_official", "read_official", "to_official"]
