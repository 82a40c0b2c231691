"""Key maps from the official code bases' state dicts to vlprune's (``vlprune.models.official`` applies them).

Written from the official models' module names (read, not copied): Salesforce ALBEF (``models/vit.py``,
``models/xbert.py``, ``model_pretrain / retrieval / vqa / nlvr / ve``), ELIP (its ALBEF variant has ALBEF's names),
LAPS (``lib/encoders.py``: a Hugging Face ViT and BERT, ``lib/cross_net.py``: the aggregation network) and PuMer
(``src/pumer/model/vilt``: ViLT's timm ViT and BERT embeddings, ``pruner.py``: the token predictors).

A ``Rule`` says how one of our tensors is made from theirs: ``copy``; ``cat`` (fused q|k|v or k|v along dim 0);
``fold`` (LAPS: ``theirs[0] * scale``, the learnable aggregation scale folded into the last aggregation layer, exact
because the softmax sees ``scale * (W h + b) = (scale W) h + scale b``). ``Ignore`` names keys of theirs that are
deliberately not used, with the reason; ``Fresh`` names parts of ours that the checkpoint does not have, with the
reason. Everything else is an error (unknown, missing or mismatched keys) unless the caller asks for a report only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: Tuple[str, ...]
    op: str = "copy"  # copy | cat | fold


@dataclass(frozen=True)
class Ignore:
    pattern: str  # a regular expression matched from the start of their key
    why: str


@dataclass(frozen=True)
class Fresh:
    prefix: str  # our keys starting with this keep their initialisation
    why: str
    from_online: bool = False  # a momentum copy: initialised as a copy of the online weights (ALBEF's copy_params)


@dataclass
class KeyMap:
    rules: List[Rule]
    ignore: List[Ignore]
    fresh: List[Fresh]
    notes: List[str]


def _wb(rules: List[Rule], ours: str, theirs: str, bias: bool = True) -> None:
    rules.append(Rule(ours + ".weight", (theirs + ".weight",)))
    if bias:
        rules.append(Rule(ours + ".bias", (theirs + ".bias",)))


def _cat(rules: List[Rule], ours: str, theirs: Sequence[str]) -> None:
    for p in ("weight", "bias"):
        rules.append(Rule(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs), "cat"))


def count_layers(keys, prefix: str) -> int:
    """Number of ``prefix{i}.`` blocks among ``keys`` (0 when none)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys for m in [pat.match(k)] if m}
    return max(found) + 1 if found else 0


# -- timm / ALBEF ViT (ALBEF's visual_encoder, ViLT's transformer) ---------------------------------------------------
def timm_vit(rules: List[Rule], ours: str, theirs: str, layers: int, emb: str = "embeddings.") -> None:
    """ALBEF's ``models/vit.py`` and ViLT's timm ViT: cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm. ``emb``: where our embeddings sit under ``ours``."""
    rules.append(Rule(f"{ours}{emb}cls_token", (theirs + "cls_token",)))
    rules.append(Rule(f"{ours}{emb}pos_embed", (theirs + "pos_embed",)))
    _wb(rules, f"{ours}{emb}patch_embed", theirs + "patch_embed.proj")
    for i in range(layers):
        o, t = f"{ours}layers.{i}.", f"{theirs}blocks.{i}."
        for a, b in (("ln1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("ln2", "norm2"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            _wb(rules, o + a, t + b)
    _wb(rules, ours + "norm", theirs + "norm")


# -- BERT (xbert / Hugging Face names) ---------------------------------------------------------------------------
def bert_embeddings(rules: List[Rule], ours: str, theirs: str) -> None:
    for a, b in (("word", "word_embeddings"), ("position", "position_embeddings"),
                 ("token_type", "token_type_embeddings")):
        rules.append(Rule(f"{ours}{a}.weight", (f"{theirs}{b}.weight",)))
    _wb(rules, ours + "ln", theirs + "LayerNorm")


def bert_layer(rules: List[Rule], ours: str, theirs: str, cross: bool) -> None:
    _cat(rules, ours + "attn.qkv", [theirs + f"attention.self.{x}" for x in ("query", "key", "value")])
    _wb(rules, ours + "attn.proj", theirs + "attention.output.dense")
    _wb(rules, ours + "attn_ln", theirs + "attention.output.LayerNorm")
    if cross:
        _wb(rules, ours + "cross.q", theirs + "crossattention.self.query")
        _cat(rules, ours + "cross.kv", [theirs + f"crossattention.self.{x}" for x in ("key", "value")])
        _wb(rules, ours + "cross.proj", theirs + "crossattention.output.dense")
        _wb(rules, ours + "cross_ln", theirs + "crossattention.output.LayerNorm")
    _wb(rules, ours + "mlp.fc1", theirs + "intermediate.dense")
    _wb(rules, ours + "mlp.fc2", theirs + "output.dense")
    _wb(rules, ours + "mlp_ln", theirs + "output.LayerNorm")


def bert_split(rules: List[Rule], text: str, fusion: Optional[str], theirs: str, text_layers: int,
               fusion_layers: int) -> None:
    """BERT layers [0, text_layers) -> our text encoder; [text_layers, + fusion_layers) -> our fusion layers (with
    cross-attention), as ALBEF splits its 12-layer BERT at ``fusion_layer`` = 6."""
    bert_embeddings(rules, text + "embeddings.", theirs + "embeddings.")
    for i in range(text_layers):
        bert_layer(rules, f"{text}layers.{i}.", f"{theirs}encoder.layer.{i}.", cross=False)
    for j in range(fusion_layers if fusion else 0):
        bert_layer(rules, f"{fusion}layers.{j}.", f"{theirs}encoder.layer.{text_layers + j}.", cross=True)


def mlm_head(rules: List[Rule], ours: str, theirs: str) -> None:
    _wb(rules, ours + "dense", theirs + "transform.dense")
    _wb(rules, ours + "ln", theirs + "transform.LayerNorm")
    rules.append(Rule(ours + "bias", (theirs + "bias",)))


# -- ALBEF (and ELIP's ALBEF) -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AlbefLayout:
    variant: str  # pretrain | retrieval | vqa | ve | nlvr2
    bert: str  # "text_encoder.bert." (pretrain: BertForMaskedLM) or "text_encoder."
    vision_layers: int
    text_layers: int  # ALBEF's fusion_layer
    fusion_layers: int
    momentum: bool
    queue: bool
    idx_queue: bool


def albef_layout(state: Dict[str, Tensor]) -> AlbefLayout:
    keys = list(state)
    if not any(k.startswith("visual_encoder.") for k in keys):
        raise ValueError("not an ALBEF state dict: no 'visual_encoder.*' keys (is --format right?)")
    bert = "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in keys) else "text_encoder."
    n = count_layers(keys, bert + "encoder.layer.")
    cross = sorted({int(m.group(1)) for k in keys for m in [re.match(re.escape(bert) + r"encoder\.layer\.(\d+)\.crossattention", k)] if m})
    if n == 0 or not cross:
        raise ValueError(f"not an ALBEF state dict: no BERT layers with cross-attention under {bert!r}")
    t = cross[0]
    variant = "retrieval"
    if bert.endswith("bert."):
        variant = "pretrain"
    elif any(k.startswith("text_decoder.") for k in keys):
        variant = "vqa"
    elif "cls_head.2.weight" in keys:
        variant = "nlvr2" if state["cls_head.2.weight"].shape[0] == 2 else "ve"
    fusion = (n - t) // 2 if variant == "nlvr2" else n - t
    return AlbefLayout(variant, bert, count_layers(keys, "visual_encoder.blocks."), t, fusion,
                       any(k.startswith("visual_encoder_m.") for k in keys), "image_queue" in keys, "idx_queue" in keys)


def albef_map(lay: AlbefLayout) -> KeyMap:
    rules: List[Rule] = []
    ignore = [Ignore(r".*embeddings\.position_ids$", "a buffer of the positions 0..L-1 (computed, not stored, here)")]
    fresh: List[Fresh] = []
    notes: List[str] = []
    nlvr = lay.variant == "nlvr2"
    timm_vit(rules, "vision.", "visual_encoder.", lay.vision_layers)
    bert_split(rules, "text.", None if nlvr else "fusion.", lay.bert, lay.text_layers, lay.fusion_layers)
    if lay.momentum:
        timm_vit(rules, "momentum_encoders.vision.", "visual_encoder_m.", lay.vision_layers)
        bert_split(rules, "momentum_encoders.text.", None if nlvr else "momentum_encoders.fusion.",
                   lay.bert.replace("text_encoder", "text_encoder_m"), lay.text_layers, lay.fusion_layers)
    if lay.variant in ("pretrain", "retrieval"):
        for name in ("vision_proj", "text_proj", "itm_head"):
            _wb(rules, name, name)
        rules.append(Rule("temp", ("temp",)))
        if lay.momentum:
            _wb(rules, "momentum_encoders.vision_proj", "vision_proj_m")
            _wb(rules, "momentum_encoders.text_proj", "text_proj_m")
        if lay.queue:
            rules += [Rule("image_queue", ("image_queue",)), Rule("text_queue", ("text_queue",)),
                      Rule("queue_ptr", ("queue_ptr",))]
            if lay.idx_queue:
                rules.append(Rule("idx_queue", ("idx_queue",)))
            else:
                fresh.append(Fresh("idx_queue", "ALBEF's pre-training keeps no image-id queue (filled with -100)"))
    else:
        why = {"vqa": "ALBEF's VQA model has no ITC/ITM heads", "ve": "ALBEF's SNLI-VE model has no ITC/ITM heads",
               "nlvr2": "ALBEF's NLVR2 model has no ITC/ITM heads"}[lay.variant]
        for name in ("vision_proj", "text_proj", "itm_head", "temp"):
            fresh.append(Fresh(name, why))
        fresh.append(Fresh("momentum_encoders.vision_proj", why, from_online=True))
        fresh.append(Fresh("momentum_encoders.text_proj", why, from_online=True))
    if lay.variant == "pretrain":
        mlm_head(rules, "mlm_head.", "text_encoder.cls.predictions.")
        ignore += [Ignore(r"text_encoder\.cls\.predictions\.decoder\.", "the MLM decoder, tied to the word embeddings "
                          "(ours ties it too; an untied copy that differs is noted)"),
                   Ignore(r"text_encoder_m\.cls\.", "the momentum MLM head (vlprune's momentum copies have none)")]
    else:
        fresh.append(Fresh("mlm_head.", "fine-tuned ALBEF checkpoints carry no MLM head"))
    if lay.variant == "vqa":
        ignore += [Ignore(r"text_decoder(_m)?\.", "ALBEF's answer decoder (6 BERT layers + LM head) generates / "
                          "ranks answers; vlprune's VQA classifies over an answer list with a new head, which has to "
                          "be fine-tuned: the decoder's accuracy does not carry over")]
        notes.append("VQA: no 'vqa' head is created (its answer list is not in the checkpoint); add_task_head(model, "
                     "'vqa', len(answers)) and fine-tune it ('vlprune train vqa --init-official ...')")
    if lay.variant == "ve":
        for k, t in (("0", "0"), ("2", "2")):
            _wb(rules, f"task_heads.ve.net.{k}", f"cls_head.{t}")
        ignore.append(Ignore(r"cls_head_m\.", "the momentum copy of the head (distillation during ALBEF's "
                             "fine-tuning; vlprune fine-tunes heads without it)"))
    if nlvr:
        ignore += [Ignore(re.escape(lay.bert) + rf"encoder\.layer\.({'|'.join(str(i) for i in range(lay.text_layers, lay.text_layers + 2 * lay.fusion_layers))})\.",
                          "ALBEF's NLVR2 fusion: 12 layers alternating between the two images with shared keys/values;"
                          " vlprune fuses each image alone in 6 layers and concatenates the two [CLS]"),
                   Ignore(r"text_encoder_m\.encoder\.layer\.", "momentum copy of the NLVR2 fusion layers"),
                   Ignore(r"cls_head(_m)?\.", "ALBEF's NLVR2 head reads one [CLS] of the joint fusion; vlprune's reads "
                          "two concatenated [CLS]")]
        fresh += [Fresh("fusion.", "ALBEF's NLVR2 fusion layers do not map (see the ignored keys)"),
                  Fresh("momentum_encoders.fusion.", "as the fusion layers", from_online=True)]
        notes.append("NLVR2: only the image and text encoders load; the fusion encoder and a new 'nlvr2' head "
                     "have to be fine-tuned ('vlprune train nlvr2 --init-official ...')")
    return KeyMap(rules, ignore, fresh, notes)


# -- LAPS ----------------------------------------------------------------------------------------------------------
LAPS_VIT = "img_enc.visual_encoder."
LAPS_BERT = "txt_enc.bert."


def hf_vit(rules: List[Rule], ours: str, theirs: str, layers: int) -> None:
    """A Hugging Face ``ViTModel`` (LAPS's image encoder)."""
    e = theirs + "embeddings."
    rules.append(Rule(ours + "embeddings.cls_token", (e + "cls_token",)))
    rules.append(Rule(ours + "embeddings.pos_embed", (e + "position_embeddings",)))
    _wb(rules, ours + "embeddings.patch_embed", e + "patch_embeddings.projection")
    for i in range(layers):
        o, t = f"{ours}layers.{i}.", f"{theirs}encoder.layer.{i}."
        _cat(rules, o + "attn.qkv", [t + f"attention.attention.{x}" for x in ("query", "key", "value")])
        for a, b in (("attn.proj", "attention.output.dense"), ("ln1", "layernorm_before"), ("ln2", "layernorm_after"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            _wb(rules, o + a, t + b)
    _wb(rules, ours + "norm", theirs + "layernorm")


def laps_map(vision_layers: int, text_layers: int) -> KeyMap:
    rules: List[Rule] = []
    hf_vit(rules, "vision.", LAPS_VIT, vision_layers)
    bert_split(rules, "text.", None, LAPS_BERT, text_layers, 0)
    _wb(rules, "laps.image_proj", "img_enc.vision_proj")
    _wb(rules, "laps.text_proj", "txt_enc.fc")
    _wb(rules, "laps.aggr.0", "cross_net.aggr_net.weight.0")
    _wb(rules, "laps.aggr.1", "cross_net.aggr_net.weight.1")
    for p in ("weight", "bias"):
        rules.append(Rule(f"laps.aggr.3.{p}", (f"cross_net.aggr_net.weight.3.{p}", "cross_net.aggr_net.scale"), "fold"))
    ignore = [Ignore(r".*embeddings\.position_ids$", "a buffer of the positions 0..L-1"),
              Ignore(r"(img_enc\.visual_encoder|txt_enc\.bert)\.pooler\.", "the encoders' poolers, unused by LAPS")]
    why = "LAPS has no fusion encoder, ITC projections or ITM/MLM heads: it ranks by its own similarity"
    fresh = [Fresh(p, why) for p in ("fusion.", "vision_proj", "text_proj", "itm_head", "mlm_head.", "temp")]
    notes = ["LAPS: the official code's learnable aggregation scale is folded into laps.aggr.3 (exact)",
             "LAPS: vlprune's LAPS method runs with official=True (no score net, no Gumbel), as the released code"]
    return KeyMap(rules, ignore, fresh, notes)


# -- PuMer's ViLT ----------------------------------------------------------------------------------------------------
def pumer_map(layers: int, prune_layers: Sequence[int], heads: Dict[str, str], contrast: bool,
              itm: bool = True, mlm: bool = True, prefix: str = "vilt.") -> KeyMap:
    """``prune_layers``: PuMer's 0-based layer indices (a pruner after the whole block ``i``); ``heads``: our task
    -> their head module name (vqa_classifier, nlvr2_classifier, ve_classifier)."""
    rules: List[Rule] = []
    bert_embeddings(rules, "text_embeddings.", prefix + "text_embeddings.")
    rules.append(Rule("modality.weight", (prefix + "token_type_embeddings.weight",)))
    timm_vit(rules, "", prefix + "transformer.", layers, emb="image_embeddings.")
    # timm_vit maps the final norm as "norm" and the blocks as "layers.i." : exactly our ViLT names
    _wb(rules, "pooler", prefix + "pooler.dense")
    for li in prune_layers:
        o, t = f"layers.{li}.reducer.", f"{prefix}token_pruner."
        for j in (0, 1, 3, 5, 7):
            _wb(rules, f"{o}pruner.net.{j}", f"{t}token_predictors.{li}.{j}")
    fresh = []
    for li in prune_layers:
        if contrast:
            _wb(rules, f"layers.{li}.reducer.text_proj", f"{prefix}token_pruner.text_projections.{li}")
            _wb(rules, f"layers.{li}.reducer.image_proj", f"{prefix}token_pruner.image_projections.{li}")
        else:
            for part in ("text_proj", "image_proj"):
                fresh.append(Fresh(f"layers.{li}.reducer.{part}", "this PuMer model was trained without its "
                                   "contrastive term (no token_pruner projections)"))
        fresh.append(Fresh(f"layers.{li}.reducer.temp", "PuMer's contrastive term has no learnable temperature; "
                           "TiP's starts at 0.07"))
    if itm:
        _wb(rules, "itm_head", "itm_score.fc")
    else:
        fresh.append(Fresh("itm_head", "this PuMer model has no ITM head (fine-tuned for another task)"))
    if mlm:
        mlm_head(rules, "mlm_head.", "mlm_score.")
    else:
        fresh.append(Fresh("mlm_head.", "this PuMer model has no MLM head (only pre-training has one)"))
    for task, name in heads.items():
        for j in (0, 1, 3):
            _wb(rules, f"task_heads.{task}.net.{j}", f"{name}.{j}")
    ignore = [Ignore(r".*embeddings\.position_ids$", "a buffer of the positions 0..L-1"),
              Ignore(re.escape(prefix) + r"transformer\.(head|pre_logits)\.", "the ViT's ImageNet classifier, unused by ViLT"),
              Ignore(r"mlm_score\.decoder\.", "ViLT's MLM decoder is untied from the word embeddings; vlprune's MLM head is "
                     "tied to them, so MLM logits differ (the encoder and every task head are unaffected)"),
              Ignore(r"mpp_score\.", "ViLT's masked-patch-prediction head (vlprune has none)"),
              Ignore(r"rank_output\.", "PuMer's retrieval ranking layer; vlprune's ViLT ranks with the ITM head")]
    return KeyMap(rules, ignore, fresh, ["PuMer: TiP runs with placement='post_mlp', count='pumer' "
                                                      "(PuMer's place and keep count)"])


def square_grid(n: int, what: str) -> int:
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"{what}: {n} position embeddings (without [CLS]) are not a square grid")
    return g


__all__ = ["Rule", "Ignore", "Fresh", "KeyMap", "albef_layout", "albef_map", "laps_map", "pumer_map", "count_layers"]
