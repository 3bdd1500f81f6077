"""The one place that picks and builds an executor for a model directory: in-process or a Ray model group.

Each executor module is imported only when it is asked for, so local runs never import Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from k2ray.config import EngineConfig, ParallelConfig

if TYPE_CHECKING:  # pragma: no cover
    from k2ray.executor.local import LocalExecutor
    from k2ray.executor.ray import RayExecutor


def build_executor(
    model_dir: str | Path,
    engine_cfg: EngineConfig,
    parallel_cfg: ParallelConfig | None = None,
    placement_group=None,
    bundle_offset: int = 0,
) -> "LocalExecutor | RayExecutor":
    """``parallel_cfg.executor`` decides: ``"ray"`` starts a RayExecutor (in ``placement_group`` from bundle
    ``bundle_offset`` on when given, else in a placement group of its own); ``"local"`` a LocalExecutor, which has a
    single attention worker and expert shard."""
    parallel_cfg = parallel_cfg or ParallelConfig()
    if parallel_cfg.executor == "ray":
        from k2ray.executor.ray import RayExecutor

        return RayExecutor(model_dir, engine_cfg, parallel_cfg, placement_group=placement_group,
                           bundle_offset=bundle_offset)
    if parallel_cfg.attention_workers != 1 or parallel_cfg.expert_shards != 1:
        raise ValueError("attention_workers / expert_shards > 1 need executor='ray'")
    from k2ray.executor.local import LocalExecutor

    return LocalExecutor(model_dir, engine_cfg, device=parallel_cfg.device)
