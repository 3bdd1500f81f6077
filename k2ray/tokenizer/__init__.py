"""Kimi K2 tokenizer, chat template and output parsers."""

from .chat import ChatPrompt, ChatTemplate, ChatTemplateError
from .tiny import write_tokenizer_files
from .tokenizer import IncrementalDetokenizer, KimiTokenizer

__all__ = [
    "KimiTokenizer",
    "IncrementalDetokenizer",
    "ChatTemplate",
    "ChatTemplateError",
    "ChatPrompt",
    "write_tokenizer_files",
]
