"""The chat planner with image parts (Ray-free): data: and http(s) URLs, limits, errors naming the part."""

import http.server
import threading

import pytest

from k2ray.serve.openai import protocol as P
from k2ray.serve.openai.chat import ChatOptions, plan_chat
from k2ray.serve.openai.errors import APIError
from k2ray.serve.openai.images import ImageLimits
from k2ray.serve.openai.limits import Limits
from k2ray.tokenizer import ChatTemplate, KimiTokenizer
from k2ray.tokenizer.image import ImageProcessorConfig

from .images import data_url, encode, make_image

LIMITS = Limits(max_model_len=4096, default_max_tokens=16, max_sequences=8, max_token_bytes=16)
PNG = encode(make_image(100, 70, seed=1))  # 12 image tokens with the tiny preprocessor


@pytest.fixture(scope="module")
def env(k25_dir):
    tok = KimiTokenizer.from_dir(k25_dir)
    return tok, ChatTemplate.from_dir(k25_dir, tok), ImageProcessorConfig.from_dir(k25_dir)


def _plan(env, content, options=ChatOptions(), cfg="model", **kw):
    tok, tpl, icfg = env
    req = P.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "first"}, {"role": "user", "content": content}], **kw})
    return plan_chat(req, tpl, tok, LIMITS, options, True, icfg if cfg == "model" else cfg)


def _img(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _error(fn) -> APIError:
    with pytest.raises(APIError) as info:
        fn()
    return info.value


def test_plan_counts_image_tokens(env):
    tok = env[0]
    plan = _plan(env, [{"type": "text", "text": "look"}, _img(data_url(PNG)), _img(data_url(PNG))])
    pad = tok.special_tokens["<|media_pad|>"]
    assert plan.prompt_token_ids.count(pad) == 2 and len(plan.images) == 2
    assert plan.num_prompt_tokens == len(plan.prompt_token_ids) + 2 * (12 - 1)
    assert plan.sampling.max_tokens == 16


def test_bad_images_are_400_naming_the_part(env):
    e = _error(lambda: _plan(env, [{"type": "text", "text": "x"}, _img("data:image/png;base64,AAAA")]))
    assert e.status == 400 and e.param == "messages[1].content[1]" and "cannot identify" in e.message
    e = _error(lambda: _plan(env, [_img("ftp://example.com/x.png")]))
    assert e.param == "messages[1].content[0]" and "scheme" in e.message
    e = _error(lambda: _plan(env, [_img(data_url(PNG))] * 3, ChatOptions(image_limits=ImageLimits(max_images=2))))
    assert e.param == "messages[1].content[2]" and "at most 2 images" in e.message
    e = _error(lambda: _plan(env, [_img(data_url(PNG))], ChatOptions(image_limits=ImageLimits(max_image_bytes=100))))
    assert "over the limit of 100" in e.message
    e = _error(lambda: _plan(env, [_img(data_url(PNG))], ChatOptions(image_limits=ImageLimits(max_image_pixels=99))))
    assert "exceeds the limit of 99" in e.message
    e = _error(lambda: _plan(env, [_img(data_url(PNG))], cfg=None))
    assert e.param == "messages[1].content[0]" and "does not accept images" in e.message
    e = _error(lambda: _plan(env, [{"type": "image_url", "image_url": {}}]))
    assert e.param == "messages[1].content[0].image_url.url" and e.message.startswith(e.param + ": ")


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        ctype, body, extra = self.routes.get(self.path, ("text/plain", b"missing", {}))
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", extra["to"])
            self.end_headers()
            return
        self.send_response(200 if self.path in self.routes else 404)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    _Handler.routes = {"/a.png": ("image/png", PNG, {}), "/a.txt": ("text/html", PNG, {}),
                       "/redirect": ("", b"", {"to": base + "/a.png"})}
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield base
    srv.shutdown()


def test_http_urls(env, server):
    allow = ChatOptions(image_limits=ImageLimits(allow_private_image_urls=True))
    by_url = _plan(env, [_img(server + "/a.png")], allow)
    by_data = _plan(env, [_img(data_url(PNG))], allow)
    assert by_url.images[0].content_hash == by_data.images[0].content_hash
    assert _plan(env, [_img(server + "/redirect")], allow).images[0].content_hash == by_data.images[0].content_hash
    # loopback is refused unless allowed
    e = _error(lambda: _plan(env, [_img(server + "/a.png")]))
    assert e.param == "messages[1].content[0]" and "non-public address" in e.message
    e = _error(lambda: _plan(env, [_img(server + "/a.txt")], allow))
    assert "content type 'text/html'" in e.message
    e = _error(lambda: _plan(env, [_img(server + "/nope.png")], allow))
    assert "HTTP 404" in e.message
    small = ChatOptions(image_limits=ImageLimits(allow_private_image_urls=True, max_image_bytes=50))
    assert "over the limit of 50" in _error(lambda: _plan(env, [_img(server + "/a.png")], small)).message
    off = ChatOptions(image_limits=ImageLimits(allow_image_urls=False, allow_private_image_urls=True))
    assert "data: URLs only" in _error(lambda: _plan(env, [_img(server + "/a.png")], off)).message


# -- the Anthropic and Responses translations: the same prompt and images, errors naming their own fields ---------------
def test_anthropic_image_blocks_plan_like_chat_image_parts(env):
    import base64

    from k2ray.serve.anthropic import protocol as A
    from k2ray.serve.anthropic.translate import plan_messages

    tok, tpl, icfg = env
    b64 = base64.b64encode(PNG).decode()
    blocks = [{"type": "text", "text": "look"},
              {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
              {"type": "text", "text": " and compare"},
              {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}]
    req = A.MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "system": "Be brief.",
                                            "messages": [{"role": "user", "content": blocks}]})
    ours = plan_messages(req, tpl, tok, LIMITS, ChatOptions(), True, icfg)
    chat_req = P.ChatCompletionRequest.model_validate({"model": "m", "max_tokens": 8, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "look"}, _img(data_url(PNG)),
                                     {"type": "text", "text": " and compare"}, _img(data_url(PNG))]}]})
    theirs = plan_chat(chat_req, tpl, tok, LIMITS, ChatOptions(), True, icfg)
    assert ours.prompt_token_ids == theirs.prompt_token_ids and len(ours.images) == 2
    assert ours.num_prompt_tokens == theirs.num_prompt_tokens == len(ours.prompt_token_ids) + 2 * (12 - 1)
    assert all((a.pixel_values == b.pixel_values).all() for a, b in zip(ours.images, theirs.images))
    # a broken image: the error names the Anthropic block (the system message shifted the chat indices)
    bad = A.MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "system": "Be brief.", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]})
    with pytest.raises(Exception) as info:
        plan_messages(bad, tpl, tok, LIMITS, ChatOptions(), True, icfg)
    from k2ray.serve.openai.errors import from_exception
    err = from_exception(info.value)
    assert err.status == 400 and err.param == "messages[0].content[1]", err.body()
    assert err.message.startswith("messages[0].content[1]: ")


def test_responses_input_image_plans_like_chat_image_parts(env):
    from k2ray.serve.openai.responses_api import ResponsesRequest, plan_response

    tok, tpl, icfg = env
    req = ResponsesRequest.model_validate({"model": "m", "instructions": "Be brief.", "max_output_tokens": 8, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                     {"type": "input_image", "image_url": data_url(PNG), "detail": "high"}]}]})
    ours = plan_response(req, None, tpl, tok, LIMITS, ChatOptions(), True, icfg).plan
    chat_req = P.ChatCompletionRequest.model_validate({"model": "m", "max_tokens": 8, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "look"}, _img(data_url(PNG))]}]})
    theirs = plan_chat(chat_req, tpl, tok, LIMITS, ChatOptions(), True, icfg)
    assert ours.prompt_token_ids == theirs.prompt_token_ids and ours.num_prompt_tokens == theirs.num_prompt_tokens
    bad = ResponsesRequest.model_validate({"model": "m", "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "x"},
                                     {"type": "input_image", "image_url": "ftp://example.com/x.png"}]}]})
    e = _error(lambda: plan_response(bad, None, tpl, tok, LIMITS, ChatOptions(), True, icfg))
    assert e.param == "input[0].content[1]" and e.message.startswith("input[0].content[1]: ") and "scheme" in e.message
