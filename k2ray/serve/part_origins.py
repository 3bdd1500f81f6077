"""Where a chat content part came from in a request of another API.

The Anthropic and Responses translators build OpenAI chat messages, and the chat planner names a bad image as
``messages[i].content[j]`` of THOSE messages (whose indices differ: a system message inserted, a user turn split
around its tool results, assistant items folded). The translators remember which request field each image part
came from, and errors are renamed back to it."""

from __future__ import annotations

import re
from typing import Optional

_PART = re.compile(r"(messages\[\d+\]\.content\[\d+\])(\.image_url(\.url)?)?")  # the chat part's own fields too


class PartOrigins:
    """Remembers image parts as the translator makes them; :meth:`index` them once the messages are final."""

    def __init__(self):
        self._by_id: dict[int, str] = {}
        self._by_path: dict[str, str] = {}
        self._parts: list[dict] = []  # keeps the parts alive, so their ids stay theirs

    def note(self, part: dict, where: str) -> dict:
        self._by_id[id(part)] = where
        self._parts.append(part)
        return part

    def index(self, messages: list[dict]) -> None:
        """Record the chat path of every noted part in the final ``messages``."""
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, list):
                for j, part in enumerate(content):
                    where = self._by_id.get(id(part))
                    if where is not None:
                        self._by_path[f"messages[{i}].content[{j}]"] = where

    def rename(self, text: Optional[str]) -> Optional[str]:
        """``text`` (a param or an error message) with a chat part path replaced by the request field."""
        if not text:
            return text
        m = _PART.match(text)
        if m is None or m.group(1) not in self._by_path:
            return text
        return self._by_path[m.group(1)] + text[m.end():]
