"""Per-role weight loading: the attention side (everything but routed experts) and the routed experts of a shard.

Each role reads only its own tensors from the shard files (memory-mapped through safetensors). INT4 pack-quantized
experts are dequantized to the compute dtype; FP8 block-quantized weights (K2-Instruct) are dequantized with their
``weight_scale_inv``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
from tqdm.auto import tqdm

from k2ray.checkpoint import CheckpointError
from k2ray.checkpoint.index import CheckpointIndex
from k2ray.checkpoint.int4 import dequantize_int4
from k2ray.config import ModelArgs

if TYPE_CHECKING:
    from k2ray.model.moe import RoutedFactory

_PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar for reads above 1 GiB (or with K2RAY_PROGRESS=1)
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek FP8: ``w = fp8 * scale_inv`` with one fp32 scale per ``block`` tile of the weight."""
    out, inp = weight.shape
    bo, bi = block
    s = scale_inv.float().repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out, :inp]
    return weight.float() * s


class WeightLoader:
    def __init__(
        self,
        model_dir: str | Path,
        args: ModelArgs | None = None,
        dtype: torch.dtype = torch.float32,
        progress: bool | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.args = args or ModelArgs.from_dir(model_dir)
        self.index = CheckpointIndex(model_dir)
        self.dtype = dtype
        env = os.environ.get("K2RAY_PROGRESS")
        self.progress = progress if progress is not None else (env == "1" if env is not None else None)

    # -- single tensors -----------------------------------------------------------------------------------------
    def full_name(self, name: str) -> str:
        return self.args.tensor_prefix + name

    def _where(self, name: str) -> str:
        return f"tensor {name!r} in {self.model_dir / self.index.shard_of(name)}"

    def read(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read ``name`` (without prefix), dequantizing FP8 blocks, check its shape, cast to ``dtype``."""
        full = self.full_name(name)
        t = self.index.get(full)
        if t.dtype == torch.float8_e4m3fn:
            scale_name = full + "_scale_inv"
            if scale_name not in self.index:
                raise CheckpointError(f"{self._where(full)}: fp8 weight without {scale_name!r}")
            block = tuple((self.args.quantization and self.args.quantization.weight_block_size) or (128, 128))
            t = dequantize_fp8_blocks(t, self.index.get(scale_name), block)
        elif t.dtype in (torch.int32, torch.int8, torch.uint8) and name.endswith("weight"):
            raise CheckpointError(f"{self._where(full)}: unsupported quantized format (dtype {t.dtype})")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self._where(full)}: shape {tuple(t.shape)} does not match expected {tuple(shape)}")
        return t.to(dtype or self.dtype)

    def read_packed(self, base: str, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(weight_packed int32 [out, in/8], weight_scale [out, in/group])`` checked against ``weight_shape``, or
        None when ``base`` is not stored pack-quantized."""
        packed = self.full_name(base + ".weight_packed")
        if packed not in self.index:
            return None
        w_packed = self.index.get(packed)
        scale_name = self.full_name(base + ".weight_scale")
        scale = self.index.get(scale_name)
        shape_name = self.full_name(base + ".weight_shape")
        if shape_name in self.index:
            stored = tuple(int(s) for s in self.index.get(shape_name).tolist())
            if stored != (out_features, in_features):
                raise CheckpointError(
                    f"{self._where(shape_name)}: weight_shape {stored} does not match expected "
                    f"{(out_features, in_features)}"
                )
        group = self.args.quantization.group_size if self.args.quantization else 32
        if w_packed.dtype != torch.int32:
            raise CheckpointError(f"{self._where(packed)}: expected int32 packed words, got {w_packed.dtype}")
        for name, t, want in (
            (packed, w_packed, (out_features, in_features // 8)),
            (scale_name, scale, (out_features, in_features // group)),
        ):
            if tuple(t.shape) != want:
                raise CheckpointError(f"{self._where(name)}: shape {tuple(t.shape)} does not match expected {want}")
        return w_packed, scale

    def read_linear(self, base: str, out_features: int, in_features: int) -> torch.Tensor:
        """A linear weight ``[out, in]`` stored dense, FP8 or INT4 pack-quantized (``base`` without ``.weight``)."""
        packed = self.read_packed(base, out_features, in_features)
        if packed is not None:
            return dequantize_int4(packed[0], packed[1], (out_features, in_features), dtype=self.dtype)
        if self.full_name(base + ".weight") not in self.index:
            raise CheckpointError(
                f"{self.model_dir}: tensor {self.full_name(base + '.weight_packed')!r} (or {base + '.weight'!r}) "
                "is missing from the checkpoint"
            )
        return self.read(base + ".weight", (out_features, in_features))

    # -- roles --------------------------------------------------------------------------------------------------
    def _bar(self, total_bytes: int, desc: str):
        show = self.progress if self.progress is not None else total_bytes >= _PROGRESS_MIN_BYTES
        return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not show, leave=False)

    def load_dense(self, module: torch.nn.Module) -> None:
        """Fill every parameter/buffer of ``module`` except routed experts from the checkpoint (names = keys)."""
        targets = {
            k: v for k, v in module.state_dict().items() if ".mlp.experts." not in k and not k.endswith(_SKIP_SUFFIXES)
        }
        total = sum(self.index.nbytes(self.full_name(k)) for k in targets if self.full_name(k) in self.index)
        with self._bar(total, "loading dense weights") as bar, torch.no_grad():
            for name, dst in targets.items():
                src = self.read(name, dst.shape, dtype=dst.dtype)
                dst.copy_(src)
                bar.update(src.numel() * src.element_size())

    def load_experts(self, layer: int, experts: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``w13 [n, 2I, H]`` (gate over up) and ``w2 [n, H, I]`` for ``experts`` of ``layer``."""
        a = self.args
        h, i = a.hidden_size, a.moe_intermediate_size
        w13, w2 = [], []
        for e in experts:
            if not 0 <= e < a.n_routed_experts:
                raise CheckpointError(f"expert {e} out of range (n_routed_experts={a.n_routed_experts})")
            base = f"model.layers.{layer}.mlp.experts.{e}"
            gate = self.read_linear(base + ".gate_proj", i, h)
            up = self.read_linear(base + ".up_proj", i, h)
            w13.append(torch.cat([gate, up], dim=0))
            w2.append(self.read_linear(base + ".down_proj", h, i))
        if not w13:
            return torch.empty(0, 2 * i, h, dtype=self.dtype), torch.empty(0, h, i, dtype=self.dtype)
        return torch.stack(w13), torch.stack(w2)

    def load_experts_int4(self, layer: int, experts: Iterable[int]) -> dict[str, torch.Tensor]:
        """Experts kept packed for the W4A16 kernel: ``w13_packed [n, 2I, H/8]``, ``w13_scale [n, 2I, H/g]``,
        ``w2_packed [n, H, I/8]``, ``w2_scale [n, H, I/g]`` (scales in the compute dtype)."""
        a = self.args
        h, i = a.hidden_size, a.moe_intermediate_size
        parts: dict[str, list[torch.Tensor]] = {"w13_packed": [], "w13_scale": [], "w2_packed": [], "w2_scale": []}
        for e in experts:
            base = f"model.layers.{layer}.mlp.experts.{e}"
            got = [self.read_packed(base + p, o, n) for p, o, n in
                   ((".gate_proj", i, h), (".up_proj", i, h), (".down_proj", h, i))]
            if any(g is None for g in got):
                raise CheckpointError(f"{self.model_dir}: expert {base} is not stored pack-quantized (INT4)")
            (gp, gs), (up, us), (dp, ds) = got
            parts["w13_packed"].append(torch.cat([gp, up]))
            parts["w13_scale"].append(torch.cat([gs, us]).to(self.dtype))
            parts["w2_packed"].append(dp)
            parts["w2_scale"].append(ds.to(self.dtype))
        return {k: torch.stack(v) for k, v in parts.items()}

    def load_all_experts(self, module: torch.nn.Module, experts_of_layer: dict[int, list[int]] | None = None) -> None:
        """Fill ``model.layers.L.mlp.experts.{w13,w2}`` of ``module`` (all experts unless a subset is given)."""
        a = self.args
        layers = a.moe_layers if experts_of_layer is None else sorted(experts_of_layer)
        with self._bar(len(layers), "loading experts") as bar, torch.no_grad():
            for layer in layers:
                ids = range(a.n_routed_experts) if experts_of_layer is None else experts_of_layer[layer]
                fill_experts(module.get_submodule(f"model.layers.{layer}.mlp.experts"), self, layer, ids)
                bar.update(1)


def fill_experts(experts: torch.nn.Module, loader: "WeightLoader", layer: int, ids: Iterable[int]) -> None:
    """Load ``ids`` of ``layer`` into a :class:`~k2ray.model.moe.RoutedExperts` (packed or dequantized)."""
    with torch.no_grad():
        if experts.int4:
            for name, t in loader.load_experts_int4(layer, ids).items():
                getattr(experts, name).copy_(t)
        else:
            w13, w2 = loader.load_experts(layer, ids)
            experts.w13.copy_(w13)
            experts.w2.copy_(w2)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    with_experts: bool = True,
    experts_int4: bool = False,
    routed: RoutedFactory | None = None,
):
    """Build and load a :class:`~k2ray.model.model.KimiK2ForCausalLM` from a model directory.

    ``with_experts=False`` loads everything but the routed experts; ``routed`` is handed to the model (how its MoE
    layers reach experts held elsewhere)."""
    from k2ray.model.model import KimiK2ForCausalLM

    args = ModelArgs.from_dir(model_dir)
    with torch.device("meta"):
        model = KimiK2ForCausalLM(
            args, with_experts=with_experts, dtype=dtype, experts_int4=experts_int4, routed=routed
        )
    model = model.to_empty(device="cpu")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    _restore_fp32_buffers(model)
    loader = WeightLoader(model_dir, args, dtype)
    loader.load_dense(model)
    if with_experts:
        loader.load_all_experts(model)
    return model.eval()


def _restore_fp32_buffers(model: torch.nn.Module) -> None:
    """The gate's correction bias stays fp32 whatever the compute dtype (routing is done in fp32)."""
    from k2ray.model.moe import Gate

    for m in model.modules():
        if isinstance(m, Gate):
            m.e_score_correction_bias = m.e_score_correction_bias.float()


def load_vision_encoder(model_dir: str | Path, dtype: torch.dtype = torch.float32, args: ModelArgs | None = None):
    """The Kimi K2.5 image encoder (:class:`~k2ray.model.vision.KimiVisionEncoder`): only ``vision_tower.*`` and
    ``mm_projector.*`` are read (the text workers never read them). Raises :class:`CheckpointError` when the model
    has no ``vision_config``."""
    from k2ray.model.vision import KimiVisionEncoder

    args = args or ModelArgs.from_dir(model_dir)
    if args.vision is None:
        raise CheckpointError(f"{model_dir}: the model has no image encoder (no vision_config in config.json)")
    with torch.device("meta"):
        enc = KimiVisionEncoder(args.vision)
    enc = enc.to_empty(device="cpu").to(dtype)
    index = CheckpointIndex(model_dir)
    with torch.no_grad():
        for name, dst in enc.state_dict().items():  # the encoder's names are the checkpoint's (no text prefix)
            if name not in index:
                raise CheckpointError(f"{model_dir}: tensor {name!r} is missing from the checkpoint")
            src = index.get(name)
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(f"tensor {name!r} in {Path(model_dir) / index.shard_of(name)}: shape "
                                      f"{tuple(src.shape)} does not match expected {tuple(dst.shape)}")
            dst.copy_(src.to(dtype))
    return enc.eval()
