"""Image input over the OpenAI API: the official ``openai`` client sends a data-URL image to the k2ray Serve app on
the tiny K2.5 model (one model group: 1 attention worker + 1 expert shard, Ray executor; the image encoder as its own
VisionEncoder deployment, ``vision_workers: 1``); the greedy answer equals ``LLM.chat`` (local executor, encoder
in-process) token for token, and usage counts the image's tokens."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from k2ray.llm import LLM
from k2ray.runtime.sampling import SamplingParams

from ..serve.serve_helpers import assert_openai_error, serve_app
from .images import data_url, encode, make_image

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "tiny-k25"
MAX_TOKENS = 8
IMAGE = data_url(encode(make_image(120, 90, seed=7)))
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                         {"type": "image_url", "image_url": {"url": IMAGE}}]}]


@pytest.fixture(scope="module")
def base(k25_dir, tmp_path_factory):
    args = {
        "model": str(k25_dir), "served_model_name": MODEL,
        "engine": {"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 4},
        "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 1, "cpus_per_worker": 0.5},
        "router_cpus": 0.5,
        "vision_workers": 1, "vision_worker_cpus": 0.5,
        "vision_batch_wait_ms": 300,  # concurrent encode calls surely meet in one batch (test_encoder_batches_calls)
    }
    with serve_app(args, tmp_path_factory.mktemp("k2ray-cache"), num_cpus=4) as url:
        yield url


@pytest.fixture(scope="module")
def offline(k25_dir):
    with LLM(k25_dir, num_kv_blocks=256, block_size=16) as llm:
        out = llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0))
    return out[0]


def test_openai_client_image_equals_llm_chat(base, offline):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
                                          logprobs=True, extra_body={"ignore_eos": True})
    want = offline.output
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)  # the image's tokens counted
    assert resp.usage.completion_tokens == MAX_TOKENS
    msg = resp.choices[0].message
    assert (msg.content or "", getattr(msg, "reasoning_content", None) or "") == (
        offline.messages[0].get("content") or "", offline.messages[0].get("reasoning_content") or "")
    got_lp = [c.logprob for c in resp.choices[0].logprobs.content]
    want_lp = [lp[t] for lp, t in zip(want.outputs[0].logprobs, want.outputs[0].token_ids)]
    assert len(got_lp) == len(want_lp) and max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 1e-4


def test_streaming_image_request(base, offline):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens == len(offline.output.prompt_token_ids)


def test_bad_image_is_400_naming_the_part(base):
    bad = [{"role": "user", "content": [{"type": "text", "text": "x"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": bad, "max_tokens": 2},
                   timeout=120)
    assert_openai_error(r, 400, param="messages[0].content[1]")
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": local, "max_tokens": 2},
                   timeout=120)
    assert_openai_error(r, 400, param="messages[0].content[0]")
    assert "non-public" in r.json()["error"]["message"]


def test_images_were_encoded_by_the_vision_pool(base):
    from ray import serve

    app = serve.status().applications["k2ray"]
    assert app.deployments["VisionEncoder"].status == "HEALTHY"
    handle = serve.get_deployment_handle("VisionEncoder", app_name="k2ray")
    stats = handle.stats.remote().result(timeout_s=60)
    assert stats["images_encoded"] >= 1 and stats["cache_hits"] >= 1  # the same image twice: once encoded


# -- the same image through the Anthropic Messages and OpenAI Responses APIs --------------------------------------------
def _chat_answer(base) -> tuple[str, str]:
    """The chat completion of MESSAGES (equal to LLM.chat, test above) without ignore_eos, as the other APIs run."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    msg = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                         max_tokens=MAX_TOKENS).choices[0].message
    return msg.content or "", getattr(msg, "reasoning_content", None) or ""


def test_anthropic_image_block_equals_the_chat_answer(base, offline):
    import anthropic

    b64 = IMAGE.split(",", 1)[1]
    blocks = [{"type": "text", "text": "What is shown?"},
              {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}]
    client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=300)
    n_prompt = len(offline.output.prompt_token_ids)
    count = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": blocks}])
    assert count.input_tokens == n_prompt  # the image's tokens counted
    msg = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, extra_body={"temperature": 0},
                                 messages=[{"role": "user", "content": blocks}])
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) == n_prompt
    text = "".join(b.text for b in msg.content if b.type == "text")
    thinking = "".join(b.thinking for b in msg.content if b.type == "thinking")
    assert (text, thinking) == _chat_answer(base)
    # an image inside a tool result is refused, naming the block, in Anthropic's error shape
    bad = [{"role": "user", "content": "x"},
           {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}]},
           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": blocks}]}]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=2, messages=bad)
    assert "messages[2].content[0].content[1]" in str(e.value)
    r = httpx.post(base + "/v1/messages", timeout=120, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "f_1"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0].source.type" in r.json()["error"]["message"]


def test_responses_input_image_equals_the_chat_answer(base, offline):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    resp = client.responses.create(model=MODEL, max_output_tokens=MAX_TOKENS, temperature=0, store=False, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is shown?"},
                                     {"type": "input_image", "image_url": IMAGE, "detail": "auto"}]}])
    assert resp.usage.input_tokens == len(offline.output.prompt_token_ids)
    reasoning = "".join(c.text for item in resp.output if item.type == "reasoning" for c in (item.content or []))
    assert (resp.output_text, reasoning) == _chat_answer(base)
    r = httpx.post(base + "/v1/responses", timeout=120, json={
        "model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]})
    assert_openai_error(r, 400, param="input[0].content[0].file_id")


def test_encoder_batches_concurrent_calls(base, k25_dir):
    """Three requests' images arriving together go through the encoder as one batch, each caller getting its own
    embeddings back (equal to encoding it alone)."""
    from ray import serve

    from k2ray.tokenizer.image import ImageProcessorConfig, load_image

    cfg = ImageProcessorConfig.from_dir(k25_dir)
    images = [load_image(encode(make_image(60 + 10 * k, 50, seed=100 + k)), cfg) for k in range(3)]
    handle = serve.get_deployment_handle("VisionEncoder", app_name="k2ray")
    before = handle.stats.remote().result(timeout_s=60)
    calls = [handle.encode.remote([im]) for im in images]
    embeds = [c.result(timeout_s=120) for c in calls]
    after = handle.stats.remote().result(timeout_s=60)
    assert after["largest_batch"] >= 3 and after["batches"] == before["batches"] + 1
    assert [e[0].shape[0] for e in embeds] == [im.num_tokens for im in images]
    from k2ray.config import ModelArgs
    from k2ray.runtime.vision import VisionRunner

    alone = VisionRunner(k25_dir, ModelArgs.from_dir(k25_dir), cache_size=0)
    for im, e in zip(images, embeds):  # batching packs images side by side; none sees another
        torch.testing.assert_close(e[0], alone.encode([im])[0], rtol=1e-5, atol=1e-5)


def test_an_image_resent_over_five_turns_is_encoded_once(base):
    """An agent loop resends its history, image included, every turn: the pool encodes the image once and answers the
    other four turns from its cache (the same counter feeds k2ray_vision_images_encoded_total)."""
    from ray import serve

    handle = serve.get_deployment_handle("VisionEncoder", app_name="k2ray")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    url = data_url(encode(make_image(90, 64, seed=555)))
    before = handle.stats.remote().result(timeout_s=60)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look at this."},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    for turn in range(5):
        msg = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4,
                                             extra_body={"ignore_eos": True}).choices[0].message
        messages += [{"role": "assistant", "content": msg.content or ""},
                     {"role": "user", "content": f"And now? ({turn})"}]
    after = handle.stats.remote().result(timeout_s=60)
    assert after["images_encoded"] - before["images_encoded"] == 1
    assert after["cache_hits"] - before["cache_hits"] == 4
