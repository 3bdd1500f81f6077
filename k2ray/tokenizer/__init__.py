"""Kimi K2 tokenizer, chat template and output parsers."""

from .chat import ChatPrompt, ChatTemplate, ChatTemplateError, thinking_enabled
from .parsers import ParsedOutput, StreamingOutputParser, parse_output, parse_reasoning, parse_tool_calls
from .tiny import write_tokenizer_files
from .tokenizer import IncrementalDetokenizer, KimiTokenizer

__all__ = [
    "KimiTokenizer",
    "IncrementalDetokenizer",
    "ChatTemplate",
    "ChatTemplateError",
    "ChatPrompt",
    "thinking_enabled",
    "ParsedOutput",
    "StreamingOutputParser",
    "parse_output",
    "parse_reasoning",
    "parse_tool_calls",
    "write_tokenizer_files",
]
