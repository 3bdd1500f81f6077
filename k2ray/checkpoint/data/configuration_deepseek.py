"""Kimi K2's configuration class for transformers, shipped inside each k2ray K2 checkpoint as Kimi's releases ship
theirs: ``config.json`` names it in ``auto_map``, so ``AutoConfig`` and ``AutoTokenizer`` (which reads the config
first) load a ``model_type: kimi_k2`` checkpoint with ``trust_remote_code=True`` and no code of their own. K2 is the
DeepSeek-V3 architecture; only the model type differs."""

from transformers import DeepseekV3Config as _DeepseekV3Config


class DeepseekV3Config(_DeepseekV3Config):
    model_type = "kimi_k2"
