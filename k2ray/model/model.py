"""The Kimi K2 / DeepSeek-V3 causal LM. Module names follow the checkpoint (``model.layers.L.self_attn...``)."""

from __future__ import annotations

import torch
from torch import nn

from k2ray.config import ModelArgs
from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.model.layers import MLP, RMSNorm
from k2ray.model.mla import MLAttention
from k2ray.model.moe import MoE, RoutedFactory, local_experts
from k2ray.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, routed: RoutedFactory | None):
        super().__init__()
        self.self_attn = MLAttention(args)
        self.is_moe = args.is_moe_layer(layer)
        self.mlp = (
            MoE(args, None if routed is None else routed(layer))
            if self.is_moe
            else MLP(args.hidden_size, args.intermediate_size)
        )
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, rope, cos_sin, meta, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, cos_sin, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, args: ModelArgs, routed: RoutedFactory | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, routed) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class KimiK2ForCausalLM(nn.Module):
    """Forward over a flat batch of new tokens of several sequences (see :class:`AttentionMetadata`).

    ``routed`` builds each MoE layer's routed experts (:class:`~k2ray.model.moe.RoutedBackend`). By default every
    expert is local: a :class:`~k2ray.model.moe.RoutedExperts` in ``dtype``, kept INT4-packed for the W4A16 kernel
    with ``experts_int4``. ``with_experts=False`` (and no ``routed``) builds MoE layers without routed experts; the
    attention side of expert parallelism passes ``routed=lambda layer: remote`` with one
    :class:`~k2ray.model.moe.RemoteExperts` that its worker connects to the expert shards.
    """

    def __init__(
        self,
        args: ModelArgs,
        with_experts: bool = True,
        dtype: torch.dtype = torch.float32,
        experts_int4: bool = False,
        routed: RoutedFactory | None = None,
    ):
        super().__init__()
        self.args = args
        if routed is None and with_experts:
            routed = local_experts(args, dtype=dtype, int4=experts_int4)
        self.model = _Body(args, routed)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args)

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor] | None = None,
        embed_override: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Returns the final-normed hidden states ``[num_tokens, hidden]``. ``embed_override = (rows, embeds)``
        replaces the token embeddings of the flat-batch ``rows [n]`` with ``embeds [n, hidden]`` (image tokens)."""
        x = self.model.embed_tokens(input_ids)
        if embed_override is not None:
            rows, embeds = embed_override
            x = x.index_copy(0, rows, embeds.to(x.dtype))
        cos_sin = self.rope.cos_sin(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, self.rope, cos_sin, meta, None if kv_caches is None else kv_caches[i])
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward_full(self, token_ids: list[list[int]] | torch.Tensor) -> torch.Tensor:
        """Logits for every position of each sequence, no cache (reference path). Returns a list-aligned tensor
        ``[total_tokens, vocab]`` when given lists, ``[B, S, vocab]`` when given a 2-D tensor."""
        if isinstance(token_ids, torch.Tensor):
            b, s = token_ids.shape
            flat = token_ids.reshape(-1)
            lengths = [s] * b
        else:
            lengths = [len(t) for t in token_ids]
            flat = torch.tensor([t for seq in token_ids for t in seq], dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(flat.device)
        meta = AttentionMetadata.prefill_only(lengths)
        logits = self.compute_logits(self(flat, positions, meta))
        return logits.view(b, s, -1) if isinstance(token_ids, torch.Tensor) else logits
