"""The OpenAI API front end, Ray-free: request models (``protocol``), errors, the chat and completions planners
(request -> prompt tokens + sampling parameters) and the response accumulators (engine chunks -> SSE chunks and the
final object). The Serve ingress (``k2ray.serve.ingress``) is the glue between these and the model groups."""
