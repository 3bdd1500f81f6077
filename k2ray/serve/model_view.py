"""What the ingress knows of the model, fetched once from a model group: tokenizer, chat template, context limits
(so an ingress on another node needs no checkpoint)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from k2ray.serve.config import ServeArgs
from k2ray.serve.openai.errors import unavailable
from k2ray.serve.openai.limits import Limits
from k2ray.serve.router_client import ModelGroups

log = logging.getLogger("k2ray.serve.model_view")


@dataclass
class ModelView:
    tokenizer: Any  # KimiTokenizer
    template: Any  # ChatTemplate, or None for a model without one
    limits: Limits
    info: dict
    files_dir: tempfile.TemporaryDirectory  # the tokenizer files, kept for the view's lifetime
    image_config: Any = None  # ImageProcessorConfig when the model takes images (Kimi K2.5), else None

    @property
    def thinks(self) -> bool:
        """The chat template writes think blocks (K2-Thinking; not K2-Instruct)."""
        return self.template is not None and self.template.thinks


async def load_model_view(groups: ModelGroups, args: ServeArgs) -> ModelView:
    from k2ray.tokenizer import ChatTemplate, KimiTokenizer

    try:
        files = await groups.tokenizer_files()
        info = await groups.info()
    except Exception as e:
        log.warning("model not ready: %s", e)
        raise unavailable("the model is still starting; retry shortly") from None
    tmp = tempfile.TemporaryDirectory(prefix="k2ray-tokenizer-")
    for name, data in files.items():
        with open(os.path.join(tmp.name, name), "wb") as fh:
            fh.write(data)
    tok = KimiTokenizer.from_dir(tmp.name)
    template: Optional[ChatTemplate] = None
    try:
        template = ChatTemplate.from_dir(tmp.name, tok)
    except FileNotFoundError:
        pass
    limits = Limits(
        max_model_len=int(info["max_model_len"]), default_max_tokens=args.default_max_tokens,
        max_sequences=args.group_capacity,
        max_token_bytes=max(1, max(len(tok.id_to_bytes(i)) for i in range(tok.n_base_tokens))),
    )
    image_config = None
    if info.get("vision"):
        from k2ray.tokenizer.image import ImageProcessorConfig

        image_config = ImageProcessorConfig.from_dir(tmp.name)
    return ModelView(tok, template, limits, info, tmp, image_config)
