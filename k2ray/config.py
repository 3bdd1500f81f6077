"""The one config model of k2ray: the model architecture parsed from a HuggingFace ``config.json``.

Accepts ``model_type`` ``kimi_k2`` / ``deepseek_v3`` (flat) and ``kimi_k25`` (text model nested in ``text_config``,
tensors prefixed ``language_model.``; the MoonViT image encoder in ``vision_config``, parsed into
:class:`VisionArgs`). Every key of the file must be known: a typo or an unsupported field is an error that names the
field and the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or field is invalid; the message names the file and the field."""


class RopeScaling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["yarn", "deepseek_yarn"] = "yarn"
    rope_type: Optional[str] = None
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: Optional[float] = None
    truncate: bool = True


class QuantArgs(BaseModel):
    """What k2ray needs from ``quantization_config``: which format, bits and group size."""

    model_config = ConfigDict(extra="allow")

    quant_method: str
    format: Optional[str] = None
    num_bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    weight_block_size: Optional[list[int]] = None  # fp8 block quantization
    ignore: list[str] = []


# Keys that appear in real configs but do not change the inference math.
_IGNORED_KEYS = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache", "initializer_range",
    "aux_loss_alpha", "seq_aux", "pretraining_tp", "attention_dropout", "ep_size", "num_nextn_predict_layers",
    "hidden_act", "rope_interleave", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
    "moe_layer_freq", "model_type", "quantization_config", "_name_or_path", "tie_word_embeddings", "name_or_path",
    "use_return_dict", "output_hidden_states", "output_attentions", "return_dict", "mlp_bias", "rope_parameters",
}


class VisionArgs(BaseModel):
    """Kimi K2.5's image encoder (MoonViT) and its patch-merger projector.

    The released checkpoint spells the tower's keys with a ``vt_`` prefix (``vt_hidden_size``, ...) and puts the
    projector's keys in ``vision_config`` too (``mm_hidden_size``, ``text_hidden_size``, ``projector_ln_eps``);
    transformers' ``Kimi_K25VisionConfig`` uses unprefixed names (``hidden_size``, ``pos_emb_height``, ...) and
    keeps the projector's at the top level (``projection_hidden_size``, ``projection_layer_norm_eps``). Both parse
    to the same fields (:meth:`from_dict`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    pos_emb_time: int = 4
    merge_kernel_size: tuple[int, int] = (2, 2)
    rope_theta: float = 10000.0
    mm_hidden_size: int = 1152  # the projector's per-patch LayerNorm width (= hidden_size)
    text_hidden_size: int = 7168  # the projector's output width (= the text model's hidden_size)
    projector_ln_eps: float = 1e-5
    layer_norm_eps: float = 1e-5

    @field_validator("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                     "pos_emb_height", "pos_emb_width", "pos_emb_time")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "VisionArgs":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim={self.head_dim} must be divisible by 4 (2-D rotary: x and y pairs)")
        if self.mm_hidden_size != self.hidden_size:
            raise ValueError(f"mm_hidden_size={self.mm_hidden_size} must equal hidden_size={self.hidden_size}")
        if any(k <= 0 for k in self.merge_kernel_size):
            raise ValueError("merge_kernel_size must be positive")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_size(self) -> int:
        """Patches per merged token (4 for a 2x2 kernel)."""
        return self.merge_kernel_size[0] * self.merge_kernel_size[1]

    @classmethod
    def from_dict(cls, vision: dict[str, Any], top: dict[str, Any], source: str) -> "VisionArgs":
        """``vision`` is ``vision_config``; ``top`` the top-level kimi_k25 config (transformers' projector keys).

        Keys that select an algorithm must name one k2ray implements; the message names the key.
        """
        if not isinstance(vision, dict):
            raise ConfigError(f"{source}: field 'vision_config': expected an object")
        kwargs: dict[str, Any] = {}
        for key, value in vision.items():
            where = f"vision_config.{key}"
            if key in _VISION_CHOICES:
                allowed = _VISION_CHOICES[key]
                got = tuple(value) if isinstance(value, list) else value
                if got not in allowed:
                    raise ConfigError(f"{source}: field {where!r}: unsupported value {value!r} (k2ray implements "
                                      f"{' or '.join(repr(a) for a in allowed)})")
                continue
            if key in _VISION_IGNORED:
                continue
            name = _VISION_KEYS.get(key)
            if name is None:
                raise ConfigError(f"{source}: unknown field {where!r}")
            if key == "rope_parameters":
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: field {where!r}: expected an object")
                rtype = value.get("rope_type", "axial")
                if rtype != "axial":
                    raise ConfigError(f"{source}: field '{where}.rope_type': unsupported value {rtype!r} "
                                      "(k2ray implements 'axial')")
                value = value.get("rope_theta", 10000.0)
            kwargs[name] = value
        # transformers keeps the projector's keys at the top level
        if "projection_hidden_size" in top and top["projection_hidden_size"] is not None:
            kwargs.setdefault("mm_hidden_size", top["projection_hidden_size"])
        if "projection_layer_norm_eps" in top:
            kwargs.setdefault("projector_ln_eps", top["projection_layer_norm_eps"])
        text = top.get("text_config") or {}
        if "hidden_size" in text:
            kwargs.setdefault("text_hidden_size", text["hidden_size"])
        try:
            return cls(**kwargs)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "(config)"
            raise ConfigError(f"{source}: field 'vision_config.{loc}': {err['msg']}") from None


# vision_config key (either spelling) -> VisionArgs field
_VISION_KEYS = {
    "vt_hidden_size": "hidden_size", "hidden_size": "hidden_size",
    "vt_num_hidden_layers": "num_hidden_layers", "num_hidden_layers": "num_hidden_layers",
    "vt_num_attention_heads": "num_attention_heads", "num_attention_heads": "num_attention_heads",
    "vt_intermediate_size": "intermediate_size", "intermediate_size": "intermediate_size",
    "patch_size": "patch_size",
    "init_pos_emb_height": "pos_emb_height", "pos_emb_height": "pos_emb_height",
    "init_pos_emb_width": "pos_emb_width", "pos_emb_width": "pos_emb_width",
    "init_pos_emb_time": "pos_emb_time", "pos_emb_time": "pos_emb_time",
    "merge_kernel_size": "merge_kernel_size",
    "rope_parameters": "rope_theta",
    "mm_hidden_size": "mm_hidden_size",
    "text_hidden_size": "text_hidden_size",
    "projector_ln_eps": "projector_ln_eps",
}
# Keys that pick an algorithm: the values k2ray implements (the release's and transformers' spellings).
_VISION_CHOICES: dict[str, tuple] = {
    "pos_emb_type": ("divided_fixed",),
    "merge_type": ("sd2_tpool",),
    "mm_projector_type": ("patchmerger",),
    "projector_hidden_act": ("gelu",),
    "hidden_act": ("gelu_pytorch_tanh", "gelu_tanh"),
    "video_attn_type": ("spatial_temporal",),
}
_VISION_IGNORED = {
    "model_type", "_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version",
    "initializer_range", "_attn_implementation", "vt_num_key_value_heads", "num_key_value_heads",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "name_or_path",
}
# Top-level kimi_k25 keys besides text_config / vision_config that do not change the math.
_K25_TOP_KEYS = {
    "model_type", "architectures", "auto_map", "text_config", "vision_config", "media_placeholder_token_id",
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "projection_hidden_size",
    "projection_layer_norm_eps", "tie_word_embeddings", "torch_dtype", "dtype", "transformers_version",
    "quantization_config", "use_unified_vision_chunk", "video_placeholder", "pad_token_id", "bos_token_id",
    "eos_token_id", "ignore_index", "_name_or_path", "name_or_path", "use_cache", "initializer_range",
}


class ModelArgs(BaseModel):
    """DeepSeek-V3 / Kimi K2 architecture (and, for Kimi K2.5, its image encoder in ``vision``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: Literal["kimi_k2", "deepseek_v3"] = "kimi_k2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    n_routed_experts: int
    n_shared_experts: int = 1
    num_experts_per_tok: int
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: Literal["noaux_tc"] = "noaux_tc"
    scoring_func: Literal["sigmoid"] = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    pad_token_id: Optional[int] = None
    quantization: Optional[QuantArgs] = None
    tensor_prefix: str = ""  # "language_model." for kimi_k25
    vision: Optional[VisionArgs] = None  # kimi_k25: the image encoder (tensors vision_tower.*, mm_projector.*)
    media_placeholder_token_id: Optional[int] = None  # kimi_k25: the <|media_pad|> id the image embeddings replace

    @field_validator(
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "n_group", "topk_group",
    )
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelArgs":
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even (rope rotates pairs)")
        if self.vision is not None:
            if self.vision.text_hidden_size != self.hidden_size:
                raise ValueError(f"vision_config.text_hidden_size={self.vision.text_hidden_size} does not match the "
                                 f"text model's hidden_size={self.hidden_size}")
            if not 0 <= (self.media_placeholder_token_id or 0) < self.vocab_size:
                raise ValueError(f"media_placeholder_token_id={self.media_placeholder_token_id} is outside the "
                                 f"vocabulary [0, {self.vocab_size})")
        return self

    # -- derived quantities --------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the latent ``c_kv`` plus the shared rope key (576 for K2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim and rs.factor > 1:
            m = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def experts_int4(self) -> bool:
        q = self.quantization
        return q is not None and q.quant_method == "compressed-tensors"

    # -- parsing ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        raw = dict(raw)
        prefix = ""
        mtype = raw.get("model_type")
        vision = None
        placeholder = None
        if mtype == "kimi_k25":
            top = raw
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type kimi_k25 needs a 'text_config' object")
            unknown_top = sorted(k for k in top if k not in _K25_TOP_KEYS)
            if unknown_top:
                raise ConfigError(f"{source}: unknown field {unknown_top[0]!r}")
            quant = raw.get("quantization_config", text.get("quantization_config"))
            raw = dict(text)
            if quant is not None:
                raw["quantization_config"] = quant
            # The release says tie_word_embeddings false; transformers' class defaults it to true when absent:
            # the top-level value (or the text config's) decides, false when neither says.
            if "tie_word_embeddings" in top and "tie_word_embeddings" not in raw:
                raw["tie_word_embeddings"] = top["tie_word_embeddings"]
            prefix = "language_model."
            mtype = raw.get("model_type", "kimi_k2")
            if top.get("vision_config") is not None:
                vision = VisionArgs.from_dict(top["vision_config"], top, source)
                placeholder = top.get("media_placeholder_token_id", top.get("image_token_id"))
                if not isinstance(placeholder, int):
                    raise ConfigError(f"{source}: field 'media_placeholder_token_id': expected an integer token id")
        if mtype not in ("kimi_k2", "deepseek_v3"):
            raise ConfigError(
                f"{source}: field 'model_type': unsupported value {mtype!r} (expected kimi_k2, deepseek_v3 or kimi_k25)"
            )
        fields = set(cls.model_fields)
        known = fields | _IGNORED_KEYS | {"text_config", "vision_config"}
        unknown = sorted(k for k in raw if k not in known)
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else ""))
        kwargs = {k: v for k, v in raw.items() if k in fields}
        kwargs["model_type"] = mtype
        kwargs["tensor_prefix"] = prefix
        kwargs["vision"] = vision
        kwargs["media_placeholder_token_id"] = placeholder
        if raw.get("quantization_config") is not None:
            kwargs["quantization"] = _parse_quant(raw["quantization_config"], source)
        try:
            return cls(**kwargs)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "(config)"
            raise ConfigError(f"{source}: field {loc!r}: {err['msg']}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelArgs":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json in model directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path))


def _parse_quant(q: Any, source: str) -> QuantArgs:
    if not isinstance(q, dict) or "quant_method" not in q:
        raise ConfigError(f"{source}: field 'quantization_config': expected an object with 'quant_method'")
    method = q["quant_method"]
    if method == "compressed-tensors":
        fmt = q.get("format")
        if fmt != "pack-quantized":
            raise ConfigError(
                f"{source}: field 'quantization_config.format': unsupported compressed-tensors format {fmt!r} "
                "(k2ray reads pack-quantized)"
            )
        groups = q.get("config_groups") or {}
        if len(groups) != 1:
            raise ConfigError(f"{source}: field 'quantization_config.config_groups': expected exactly one group")
        weights = next(iter(groups.values())).get("weights") or {}
        if weights.get("num_bits") != 4 or weights.get("type", "int") != "int" or not weights.get("symmetric", True):
            raise ConfigError(
                f"{source}: field 'quantization_config.config_groups.weights': only symmetric int4 is supported, "
                f"got num_bits={weights.get('num_bits')} type={weights.get('type')} symmetric={weights.get('symmetric')}"
            )
        if weights.get("strategy", "group") != "group":
            raise ConfigError(f"{source}: field 'quantization_config...weights.strategy': only 'group' is supported")
        return QuantArgs(
            quant_method=method, format=fmt, num_bits=4, group_size=int(weights.get("group_size", 32)),
            symmetric=True, ignore=list(q.get("ignore", [])),
        )
    if method == "fp8":
        block = q.get("weight_block_size", [128, 128])
        if q.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"{source}: field 'quantization_config.fmt': only e4m3 is supported")
        return QuantArgs(quant_method=method, format="fp8", weight_block_size=list(block))
    raise ConfigError(f"{source}: field 'quantization_config.quant_method': unsupported quantization {method!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Runtime configuration: how a model group is laid out and how its engine batches.
# ---------------------------------------------------------------------------------------------------------------------


def check_resources(v: dict[str, float]) -> dict[str, float]:
    """Extra Ray resources of an actor: none negative."""
    bad = [k for k, x in v.items() if x < 0]
    if bad:
        raise ValueError(f"resource {bad[0]!r} must not be negative")
    return v


class PoolPlacement(BaseModel):
    """Where the actors of one pool (attention workers or expert shards) may run.

    ``resources`` are extra Ray resources each actor needs (custom node resources pin a pool to its nodes, e.g.
    ``{"k2ray_experts": 1}``); ``node_labels`` must all match the Ray node labels of the chosen node. ``gpus`` /
    ``cpus`` override the group-wide per-worker amounts.
    """

    model_config = ConfigDict(extra="forbid")

    gpus: Optional[float] = None
    cpus: Optional[float] = None
    resources: dict[str, float] = {}
    node_labels: dict[str, str] = {}

    @field_validator("gpus", "cpus")
    @classmethod
    def _non_negative_opt(cls, v):
        if v is not None and v < 0:
            raise ValueError("must not be negative")
        return v

    @field_validator("resources")
    @classmethod
    def _non_negative_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_resources(v)


class EplbConfig(BaseModel):
    """Expert-parallel load balancing (k2ray/parallel/eplb.py): per-layer expert placement with redundant copies,
    planned from the measured load and switched live. Rebalancing on demand (``POST /v1/k2ray/rebalance``) works
    with these defaults; periodic rebalancing is off until ``interval_steps`` is set."""

    model_config = ConfigDict(extra="forbid")

    window_steps: int = 256  # engine steps of expert load a plan is made from (and the balancedness gauge covers)
    interval_steps: int = 0  # rebalance every this many steps (at least window_steps); 0: only on demand
    # Extra slots per shard and MoE layer beyond an equal share of the experts, for copies of the hottest experts.
    # Each costs one expert's weights per layer on every shard (K2 INT4: ~22 MB x 60 layers).
    redundant_slots_per_shard: int = 0

    @field_validator("window_steps")
    @classmethod
    def _window(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("interval_steps", "redundant_slots_per_shard")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must not be negative")
        return v

    @model_validator(mode="after")
    def _interval_covers_window(self) -> "EplbConfig":
        if 0 < self.interval_steps < self.window_steps:
            raise ValueError(f"interval_steps={self.interval_steps} is shorter than window_steps="
                             f"{self.window_steps}: a plan would be made from a partial window")
        return self


POOLS = ("attention_workers", "expert_shards")  # the two pools of a model group, by their ParallelConfig fields


class PoolRange(BaseModel):
    """How far one pool may be resized while serving (None: the count it starts with)."""

    model_config = ConfigDict(extra="forbid")

    min: Optional[int] = None
    max: Optional[int] = None

    @field_validator("min", "max")
    @classmethod
    def _at_least_one(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v


class ElasticConfig(BaseModel):
    """Attention and expert pools that resize while serving (Ray executor; k2ray/parallel/elastic.py).

    A pool whose ``max`` is above its ``min`` is elastic: the router adds or removes one worker at a time on its own
    signals (with ``policy``), and the admin call ``POST /v1/k2ray/resize`` sets either count within the range. The
    attention pool follows KV-cache use and waiting sequences; the expert pool follows the share of the step the
    attention workers wait for the experts (their compute and the all-to-all). A signal must hold for ``window_s``
    (and the opposite thresholds differ), and no pool changes within ``cooldown_s`` of the last change."""

    model_config = ConfigDict(extra="forbid")

    attention_workers: PoolRange = PoolRange()
    expert_shards: PoolRange = PoolRange()
    policy: bool = True  # the router resizes on its own signals; False: only the admin call does
    window_s: float = Field(30.0, ge=0)  # a signal must hold this long before the policy acts on it
    cooldown_s: float = Field(120.0, ge=0)  # no resize this soon after the last one (new workers need time to show)
    kv_usage_high: float = 0.85  # attention up at or above this mean KV-cache use ...
    waiting_high: float = Field(1.0, ge=0)  # ... or this many waiting sequences (mean over the window)
    kv_usage_low: float = 0.3  # attention down below this use with nothing waiting
    expert_wait_high: float = 0.5  # experts up when the attention workers wait this share of a step for them
    expert_wait_low: float = 0.15  # experts down below this share
    # A removed attention worker takes no new sequences; those running on it have this long to finish before they
    # move to the other workers by recomputation.
    drain_timeout_s: float = Field(30.0, ge=0)
    # Added workers wait this long for their resources (a pending placement group lets the KubeRay autoscaler add a
    # node); the resize is abandoned after it.
    reserve_timeout_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _thresholds(self) -> "ElasticConfig":
        if not self.kv_usage_low < self.kv_usage_high:
            raise ValueError("kv_usage_low must be below kv_usage_high (the gap is the hysteresis)")
        if not self.expert_wait_low < self.expert_wait_high:
            raise ValueError("expert_wait_low must be below expert_wait_high (the gap is the hysteresis)")
        return self

    def bounds(self, pool: str, start: int) -> tuple[int, int]:
        """(min, max) of ``pool`` ("attention_workers" or "expert_shards") for a group that starts with ``start``."""
        r: PoolRange = getattr(self, pool)
        return (start if r.min is None else r.min, start if r.max is None else r.max)


class ParallelConfig(BaseModel):
    """Layout of one model group: A attention workers (data-parallel attention) and E expert shards."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "ray"] = "local"
    attention_workers: int = 1
    expert_shards: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    redundant_experts: int = 0  # extra physical copies of the hottest experts (spread over shards)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    attention_pool: PoolPlacement = PoolPlacement()
    expert_pool: PoolPlacement = PoolPlacement()
    validate_cluster: bool = True  # check the cluster can hold the plan before starting anything
    collective_timeout_s: float = 60.0  # a stalled collective fails the step after this long
    overlap_shared_expert: bool = True  # run the shared expert while the routed tokens are at the expert shards
    eplb: EplbConfig = EplbConfig()  # live expert rebalancing (Ray executor); periodic only when interval_steps > 0
    elastic: ElasticConfig = ElasticConfig()  # pools that resize while serving (Ray executor); fixed by default

    @field_validator("attention_workers", "expert_shards")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("gpus_per_worker", "cpus_per_worker", "redundant_experts")
    @classmethod
    def _non_negative(cls, v):
        if v < 0:
            raise ValueError("must not be negative")
        return v

    @model_validator(mode="after")
    def _device_backend(self) -> "ParallelConfig":
        if self.backend == "nccl" and self.device != "cuda":
            raise ValueError("backend 'nccl' needs device 'cuda'")
        if self.device == "cuda" and self.gpus_per_worker <= 0:
            raise ValueError("device 'cuda' needs gpus_per_worker > 0")
        if self.eplb.interval_steps and (self.executor != "ray" or self.expert_shards < 2):
            raise ValueError("eplb.interval_steps needs executor 'ray' and at least 2 expert_shards")
        for pool in POOLS:
            lo, hi = self.pool_bounds(pool)
            if not lo <= getattr(self, pool) <= hi:
                raise ValueError(f"elastic.{pool}: min={lo} and max={hi} must hold {pool}={getattr(self, pool)}")
        if self.elastic_pools and self.executor != "ray":
            raise ValueError("elastic pools (elastic.*.max above min) need executor 'ray'")
        return self

    def pool_bounds(self, pool: str) -> tuple[int, int]:
        """(min, max) of ``pool`` ("attention_workers" or "expert_shards"): ``elastic``'s range, by default the
        pool's own size."""
        return self.elastic.bounds(pool, getattr(self, pool))

    @property
    def elastic_pools(self) -> list[str]:
        """The pools that may be resized while serving."""
        return [pool for pool in POOLS if (lambda b: b[1] > b[0])(self.pool_bounds(pool))]

    def resized(self, attention_workers: int, expert_shards: int) -> "ParallelConfig":
        """This layout with other pool sizes (the elastic ranges stay as configured, in absolute counts)."""
        el = self.elastic.model_copy(update={pool: PoolRange(min=lo, max=hi) for pool in POOLS
                                             for lo, hi in [self.pool_bounds(pool)]})
        return self.model_copy(update={"attention_workers": attention_workers, "expert_shards": expert_shards,
                                       "elastic": el})

    @property
    def collective_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.device == "cuda" else "gloo"

    def pool_bundle(self, pool: str) -> dict[str, float]:
        """Ray resources of one actor of ``pool`` ("attention" or "experts")."""
        p = self.attention_pool if pool == "attention" else self.expert_pool
        cpus = self.cpus_per_worker if p.cpus is None else p.cpus
        gpus = self.gpus_per_worker if p.gpus is None else p.gpus
        b = {"CPU": cpus} if cpus else {}
        if gpus:
            b["GPU"] = gpus
        b.update({k: v for k, v in p.resources.items() if v})
        return b

    def bundles(self) -> list[dict[str, float]]:
        """One bundle per attention worker, then one per expert shard (the group's placement group)."""
        return [self.pool_bundle("attention")] * self.attention_workers + [
            self.pool_bundle("experts")
        ] * self.expert_shards

    def bundle_label_selectors(self) -> list[dict[str, str]]:
        return [dict(self.attention_pool.node_labels)] * self.attention_workers + [
            dict(self.expert_pool.node_labels)
        ] * self.expert_shards

    def check_against(self, args: ModelArgs) -> None:
        """Validate the layout against the model (e.g. more shards than experts)."""
        if self.expert_shards > args.n_routed_experts:
            raise ConfigError(
                f"parallel.expert_shards={self.expert_shards} exceeds the model's n_routed_experts="
                f"{args.n_routed_experts}"
            )
        top = self.pool_bounds("expert_shards")[1]
        if top > args.n_routed_experts:
            raise ConfigError(f"parallel.elastic.expert_shards.max={top} exceeds the model's n_routed_experts="
                              f"{args.n_routed_experts}")
        slots = -(-args.n_routed_experts // self.expert_shards) + self.eplb.redundant_slots_per_shard
        if self.expert_shards > 1 and self.eplb.redundant_slots_per_shard and slots > args.n_routed_experts:
            raise ConfigError(
                f"parallel.eplb.redundant_slots_per_shard={self.eplb.redundant_slots_per_shard} gives {slots} slots "
                f"per shard, more than the model's {args.n_routed_experts} experts (a shard holds one copy of each)"
            )


class EngineConfig(BaseModel):
    """Continuous-batching limits and the paged latent cache."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    block_size: int = 16
    num_kv_blocks: Optional[int] = None  # per attention worker; derived from kv_cache_memory_gb when unset
    kv_cache_memory_gb: float = 0.25
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: Optional[int] = None  # defaults to min(max_position_embeddings, cache capacity)
    enable_prefix_caching: bool = True
    seed: int = 0
    # Routed experts: "int4" keeps INT4 checkpoints packed for the W4A16 kernel, "dequantized" expands them to the
    # compute dtype; "auto" packs on CUDA (a quarter of the memory) and dequantizes on CPU (faster torch path).
    expert_format: Literal["auto", "dequantized", "int4"] = "auto"
    # Wall-clock budget for compiling one request's grammar (JSON schema, tools, regex, EBNF); a grammar that takes
    # longer is refused as a 400 naming the part at fault (xgrammar keeps compiling it in the background, into its
    # cache, but no request waits for it).
    grammar_compile_timeout_s: float = 10.0
    # Long context without stalls (#21). A step spends at most a cost budget in token-equivalents, where a token
    # computed at context c costs 1 + c / attention_cost_tokens (its attention over the c tokens before it), so
    # prompt chunks at long context are smaller and a step carrying one takes about as long as a short-context step:
    # the decodes in it are not held up (k2ray/engine/step_cost.py, scheduler.py).
    # attention_cost_tokens: the context length at which a token's attention costs as much as all the rest of its
    # work (projections, experts). For the real K2 the FLOPs balance near 25K tokens (~64 GFLOP per token against
    # ~2.5 MFLOP per token of context); 8192 leaves room for attention kernels below their peak. The demo model on a
    # 2-core CPU measures a few hundred (deploy/config.yaml: 256). Smaller: shorter steps at long context, longer
    # time to first token for long prompts.
    attention_cost_tokens: int = 8192
    # The step's budget in token-equivalents; None: max_num_batched_tokens (so short-context steps are unchanged).
    max_step_cost: Optional[int] = None
    # A target step time: the budget is rescaled from measured steps (an exponential average of ms per
    # token-equivalent) to max_step_ms / that. A step is never shorter than its decodes plus one block of prompt.
    max_step_ms: Optional[float] = None

    @field_validator("grammar_compile_timeout_s")
    @classmethod
    def _positive_float(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be positive")
        return v

    @field_validator("max_step_ms")
    @classmethod
    def _positive_opt_float(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not 0 < v < float("inf"):
            raise ValueError("must be positive and finite")
        return v

    @field_validator("block_size", "max_num_seqs", "max_num_batched_tokens", "attention_cost_tokens")
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("num_kv_blocks", "max_model_len", "max_step_cost")
    @classmethod
    def _positive_opt(cls, v):
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def experts_int4(self, args: ModelArgs, device: str) -> bool:
        if self.expert_format == "int4" and not args.experts_int4:
            raise ConfigError("engine.expert_format='int4' needs a checkpoint with INT4 (compressed-tensors) experts")
        return self.expert_format == "int4" or (
            self.expert_format == "auto" and device == "cuda" and args.experts_int4
        )

    def kv_blocks_for(self, args: ModelArgs) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        bytes_per_block = self.block_size * args.kv_cache_dim * args.num_hidden_layers * self.torch_dtype.itemsize
        return max(1, int(self.kv_cache_memory_gb * (1 << 30)) // bytes_per_block)
