"""Build vlprune models from Hugging Face checkpoints (hub id or local directory) by key mapping.

Image encoders: CLIP vision towers (``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` and the vision half of
a full ``CLIPModel``) and ``ViTModel`` / ``ViTForImageClassification``. Text: ``BertModel``, ``BertForMaskedLM``,
``BertForPreTraining``; BERT's lower layers become the text encoder and, as ALBEF does, its upper layers initialise
the fusion layers' self-attention and MLP (the cross-attention is new). Transformers itself is not needed: the
checkpoint's ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read with weights_only=True)
are read directly. A hub id is resolved with ``huggingface_hub`` (it downloads; tests use local directories).

Key map (ours <- theirs), layer i:
  CLIP: embeddings.cls_token <- embeddings.class_embedding; embeddings.patch_embed <- embeddings.patch_embedding;
        embeddings.pos_embed <- embeddings.position_embedding.weight; embeddings.pre_norm <- pre_layrnorm;
        layers.i.attn.qkv <- cat(self_attn.{q,k,v}_proj); attn.proj <- self_attn.out_proj; ln1/ln2 <-
        layer_norm1/2; mlp.fc1/fc2 <- mlp.fc1/fc2; norm <- post_layernorm.
  ViT:  cls_token <- embeddings.cls_token; patch_embed <- embeddings.patch_embeddings.projection; pos_embed <-
        embeddings.position_embeddings; attn.qkv <- cat(attention.attention.{query,key,value}); attn.proj <-
        attention.output.dense; ln1 <- layernorm_before; ln2 <- layernorm_after; mlp.fc1 <- intermediate.dense;
        mlp.fc2 <- output.dense; norm <- layernorm.
  BERT: embeddings.{word,position,token_type} <- embeddings.{word,position,token_type}_embeddings;
        embeddings.ln <- embeddings.LayerNorm; attn.qkv <- cat(attention.self.{query,key,value}); attn.proj <-
        attention.output.dense; attn_ln <- attention.output.LayerNorm; mlp.fc1 <- intermediate.dense; mlp.fc2 <-
        output.dense; mlp_ln <- output.LayerNorm; mlm_head.{dense,ln,bias} <- cls.predictions.transform.dense,
        cls.predictions.transform.LayerNorm, cls.predictions.bias (when present).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import ModelConfig, TextConfig, VisionConfig
from .build import MethodLike, attach, build_model

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve(path_or_id: str) -> Path:
    """A local checkpoint directory, or a hub id downloaded with huggingface_hub (config + weights + vocab)."""
    p = Path(path_or_id)
    if p.is_dir():
        return p
    if p.exists() or str(path_or_id).startswith((".", "/")):
        raise FileNotFoundError(f"Hugging Face checkpoint directory not found: {path_or_id}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise ImportError("loading by hub id needs huggingface_hub (pip install huggingface_hub)") from e
    patterns = ["config.json", "*.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer*.json"]
    return Path(snapshot_download(str(path_or_id), allow_patterns=patterns))


def read_checkpoint(d: Path) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """(config.json as a dict, the state dict) of a Hugging Face checkpoint directory; a corrupt config or a truncated
    weight file is a ValueError that names the file."""
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in Hugging Face checkpoint {d}")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not a readable JSON config ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: a config must be a JSON object, got {type(config).__name__}")
    st = sorted(d.glob("*.safetensors"))
    files = [str(f) for f in st] if st else [str(d / "pytorch_model.bin")]
    if not st and not (d / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {d}")
    state: Dict[str, Tensor] = {}
    for f in files:
        try:
            if st:
                from safetensors.torch import load_file

                state.update(load_file(f))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # safetensors' SafetensorError, pickle / zip errors of a truncated .bin
            raise ValueError(f"{f}: cannot read the weights, the file is truncated or corrupt "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
    return config, state


def _strip(state: Dict[str, Tensor], prefixes) -> Dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _act(name: str) -> str:
    return {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
            "relu": "relu"}.get(name, name)


def vision_from_hf(config: Dict[str, Any], state: Dict[str, Tensor]) -> Tuple[VisionConfig, Dict[str, Tensor]]:
    """Our VisionConfig and ViT state dict from a CLIP vision or ViT checkpoint."""
    mt = config.get("model_type")
    if mt == "clip":
        config = config["vision_config"]
        mt = "clip_vision_model"
    if mt not in ("clip_vision_model", "vit"):
        raise ValueError(f"unsupported image encoder model_type {mt!r}; supported: clip, clip_vision_model, vit")
    clip = mt == "clip_vision_model"
    s = _strip(state, ("vision_model.", "vit."))
    cfg = VisionConfig(
        image_size=config["image_size"], patch_size=config["patch_size"], width=config["hidden_size"],
        layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
        mlp_dim=config["intermediate_size"], channels=config.get("num_channels", 3),
        act=_act(config.get("hidden_act", "quick_gelu" if clip else "gelu")),
        ln_eps=config.get("layer_norm_eps", 1e-5 if clip else 1e-12), qkv_bias=config.get("qkv_bias", True),
        patch_bias=not clip, pre_norm=clip,
        image_mean=CLIP_MEAN if clip else (0.5, 0.5, 0.5), image_std=CLIP_STD if clip else (0.5, 0.5, 0.5),
    )
    out: Dict[str, Tensor] = {}
    if clip:
        e = "embeddings."
        out["embeddings.cls_token"] = s[e + "class_embedding"].reshape(1, 1, -1)
        out["embeddings.patch_embed.weight"] = s[e + "patch_embedding.weight"]
        out["embeddings.pos_embed"] = s[e + "position_embedding.weight"].unsqueeze(0)
        _ln(out, "embeddings.pre_norm", s, "pre_layrnorm")
        _ln(out, "norm", s, "post_layernorm")
        names = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
                     ln1="layer_norm1", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")
        prefix = "encoder.layers.{}."
    else:
        e = "embeddings."
        out["embeddings.cls_token"] = s[e + "cls_token"]
        out["embeddings.patch_embed.weight"] = s[e + "patch_embeddings.projection.weight"]
        out["embeddings.patch_embed.bias"] = s[e + "patch_embeddings.projection.bias"]
        out["embeddings.pos_embed"] = s[e + "position_embeddings"]
        _ln(out, "norm", s, "layernorm")
        names = dict(q="attention.attention.query", k="attention.attention.key", v="attention.attention.value",
                     o="attention.output.dense", ln1="layernorm_before", ln2="layernorm_after",
                     fc1="intermediate.dense", fc2="output.dense")
        prefix = "encoder.layer.{}."
    for i in range(cfg.layers):
        src, dst = prefix.format(i), f"layers.{i}."
        _qkv(out, dst + "attn.qkv", s, [src + names[x] for x in "qkv"])
        _lin(out, dst + "attn.proj", s, src + names["o"])
        _ln(out, dst + "ln1", s, src + names["ln1"])
        _ln(out, dst + "ln2", s, src + names["ln2"])
        _lin(out, dst + "mlp.fc1", s, src + names["fc1"])
        _lin(out, dst + "mlp.fc2", s, src + names["fc2"])
    return cfg, out


def text_from_hf(
    config: Dict[str, Any], state: Dict[str, Tensor], text_layers: int
) -> Tuple[TextConfig, Dict[str, Tensor], Dict[str, Tensor], Dict[str, Tensor]]:
    """Our TextConfig and the state dicts of the text encoder (BERT layers [0, text_layers)), of the fusion
    layers (BERT layers [text_layers, n), self-attention and MLP only) and of the MLM head (may be empty)."""
    if config.get("model_type") != "bert":
        raise ValueError(f"unsupported text encoder model_type {config.get('model_type')!r}; supported: bert")
    n = config["num_hidden_layers"]
    if not 1 <= text_layers <= n:
        raise ValueError(f"text_layers must be in [1, {n}] for this {n}-layer BERT, got {text_layers}")
    s = _strip(state, ("bert.",))
    cfg = TextConfig(
        vocab_size=config["vocab_size"], width=config["hidden_size"], layers=text_layers,
        heads=config["num_attention_heads"], mlp_dim=config["intermediate_size"],
        max_len=config["max_position_embeddings"], type_vocab_size=config.get("type_vocab_size", 2),
        pad_token_id=config.get("pad_token_id") or 0, act=_act(config.get("hidden_act", "gelu")),
        ln_eps=config.get("layer_norm_eps", 1e-12), dropout=config.get("hidden_dropout_prob", 0.1),
    )
    text: Dict[str, Tensor] = {}
    e = "embeddings."
    text["embeddings.word.weight"] = s[e + "word_embeddings.weight"]
    text["embeddings.position.weight"] = s[e + "position_embeddings.weight"]
    text["embeddings.token_type.weight"] = s[e + "token_type_embeddings.weight"]
    _ln(text, "embeddings.ln", s, e + "LayerNorm")
    fusion: Dict[str, Tensor] = {}
    for i in range(n):
        src = f"encoder.layer.{i}."
        dst, tgt = (f"layers.{i}.", text) if i < text_layers else (f"layers.{i - text_layers}.", fusion)
        _qkv(tgt, dst + "attn.qkv", s, [src + f"attention.self.{x}" for x in ("query", "key", "value")])
        _lin(tgt, dst + "attn.proj", s, src + "attention.output.dense")
        _ln(tgt, dst + "attn_ln", s, src + "attention.output.LayerNorm")
        _lin(tgt, dst + "mlp.fc1", s, src + "intermediate.dense")
        _lin(tgt, dst + "mlp.fc2", s, src + "output.dense")
        _ln(tgt, dst + "mlp_ln", s, src + "output.LayerNorm")
    mlm: Dict[str, Tensor] = {}
    if "cls.predictions.bias" in s:
        _lin(mlm, "dense", s, "cls.predictions.transform.dense")
        _ln(mlm, "ln", s, "cls.predictions.transform.LayerNorm")
        mlm["bias"] = s["cls.predictions.bias"]
    return cfg, text, fusion, mlm


def _lin(out, dst, s, src):
    out[dst + ".weight"] = s[src + ".weight"]
    if src + ".bias" in s:
        out[dst + ".bias"] = s[src + ".bias"]


_ln = _lin


def _qkv(out, dst, s, srcs):
    out[dst + ".weight"] = torch.cat([s[x + ".weight"] for x in srcs], dim=0)
    if srcs[0] + ".bias" in s:
        out[dst + ".bias"] = torch.cat([s[x + ".bias"] for x in srcs], dim=0)


def _load_part(module: nn.Module, state: Dict[str, Tensor], what: str, allow_missing=()) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state and not any(a in k for a in allow_missing)]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{what}: missing {missing[:8]}, unexpected {unexpected[:8]}, shape mismatches {bad[:8]}")
    module.load_state_dict(state, strict=False)


def from_hf(
    vision: str,
    text: str,
    text_layers: Optional[int] = None,
    method: MethodLike = None,
    embed_dim: int = 256,
    queue_size: int = 0,
    use_momentum: bool = True,
    image_size: Optional[int] = None,
) -> nn.Module:
    """An ALBEF-style model whose image encoder comes from ``vision`` (CLIP vision tower or ViT) and whose text and
    fusion encoders come from ``text`` (BERT), each a hub id or a local directory.

    ``text_layers``: BERT layers used as the text encoder (default: half, as ALBEF's 6 + 6); the remaining upper
    layers initialise the fusion layers. ``image_size``: run at another resolution (position embeddings are
    interpolated). Heads (ITC projections, ITM) are new; the MLM head is loaded when the checkpoint has one.
    """
    vconf, vstate = read_checkpoint(resolve(vision))
    tconf, tstate = read_checkpoint(resolve(text))
    vcfg, vsd = vision_from_hf(vconf, vstate)
    n = tconf.get("num_hidden_layers", 0)
    tl = text_layers if text_layers is not None else max(1, n // 2)
    tcfg, tsd, fsd, msd = text_from_hf(tconf, tstate, tl)
    if n - tl < 1:
        raise ValueError(f"BERT has {n} layers; text_layers={tl} leaves none for the fusion encoder")
    cfg = ModelConfig(arch="albef", vision=vcfg, text=tcfg, fusion_layers=n - tl, embed_dim=embed_dim,
                      queue_size=queue_size, use_momentum=use_momentum)
    model = build_model(cfg)
    _load_part(model.vision, vsd, f"image encoder from {vision}")
    _load_part(model.text, tsd, f"text encoder from {text}")
    _load_part(model.fusion, fsd, f"fusion layers from {text}", allow_missing=(".cross", ".cross_ln"))
    if msd:
        _load_part(model.mlm_head, msd, f"MLM head from {text}")
    if image_size is not None and image_size != vcfg.image_size:
        from .build import load_state_strict
        from ..config import override

        state = model.state_dict()
        model = build_model(override(cfg, **{"vision.image_size": image_size}))
        load_state_strict(model, state, f"{vision} at image size {image_size}")
    model.copy_to_momentum()
    attach(model, method)
    log.info("loaded image encoder %s and text encoder %s (%d text + %d fusion layers)", vision, text, tl, n - tl)
    return model
