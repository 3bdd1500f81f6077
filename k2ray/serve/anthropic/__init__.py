"""The Anthropic Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) as a translation onto the chat
planner and accumulator of :mod:`k2ray.serve.openai`: Ray-free, like it."""
