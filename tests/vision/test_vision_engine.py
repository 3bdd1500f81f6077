"""Images through the engine: prefix caching keyed by image content, chunked prefill across an image, errors."""

import pytest
import torch

from k2ray.engine.kv_cache import block_hashes
from k2ray.engine.request import MMItem, Request
from k2ray.llm import LLM
from k2ray.runtime.sampling import SamplingParams
from k2ray.tokenizer.image import ImageProcessorConfig, load_image

from .images import data_url, encode, make_image

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _conv(*images, text="Describe."):
    parts = [{"type": "image_url", "image_url": {"url": data_url(encode(im))}} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def llm(k25_dir):
    with LLM(k25_dir, num_kv_blocks=256, block_size=4) as llm:
        yield llm


def test_block_hashes_carry_image_hashes():
    toks = [7] * 16
    req = Request("r", toks, SamplingParams())
    plain = block_hashes(toks, 4, 4)
    assert block_hashes(toks, 4, 4, extra_of=req.block_extra) == plain  # no images: text hashes unchanged
    req.mm_items = [MMItem(offset=5, length=6, content_hash=b"a" * 16)]
    other = Request("s", toks, SamplingParams())
    other.mm_items = [MMItem(offset=5, length=6, content_hash=b"b" * 16)]
    ha = block_hashes(toks, 4, 4, extra_of=req.block_extra)
    hb = block_hashes(toks, 4, 4, extra_of=other.block_extra)
    assert ha[0] == hb[0] == plain[0]  # the block before the image is shared
    assert ha[1] != hb[1] and ha[2] != hb[2] and ha[3] != hb[3]  # the image's blocks and every later one are not


def test_prefix_cache_never_shares_blocks_between_different_images(llm):
    eng = llm.engine
    a, b = make_image(100, 70, seed=1), make_image(100, 70, seed=2)
    first = llm.chat(_conv(a), GREEDY)[0].output
    again = llm.chat(_conv(a), GREEDY)[0].output
    other = llm.chat(_conv(b), GREEDY)[0].output
    assert first.prompt_token_ids == again.prompt_token_ids == other.prompt_token_ids  # same tokens...
    pad = eng.args.media_placeholder_token_id
    first_pad = first.prompt_token_ids.index(pad)
    assert again.num_cached_tokens >= len(first.prompt_token_ids) - 4  # the same image: its blocks are reused
    assert other.num_cached_tokens <= first_pad  # ...but another image: nothing from its first image block on
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # the cached run equals a fresh run of the other image without any cache
    with LLM(llm.model_dir, num_kv_blocks=256, block_size=4, enable_prefix_caching=False) as fresh:
        assert fresh.chat(_conv(b), GREEDY)[0].output.outputs[0].token_ids == other.outputs[0].token_ids


def test_chunked_prefill_splitting_an_image_gives_the_same_tokens(k25_dir, llm):
    conv = _conv(make_image(200, 150, seed=4), make_image(60, 90, seed=5))
    want = llm.chat(conv, GREEDY)[0].output.outputs[0].token_ids
    with LLM(k25_dir, num_kv_blocks=256, block_size=4, max_num_batched_tokens=32) as small:
        assert small.chat(conv, GREEDY)[0].output.outputs[0].token_ids == want


def test_text_only_prompt_is_unaffected(llm):
    conv = [{"role": "user", "content": [{"type": "text", "text": "Just text."}]}]
    out = llm.chat(conv, GREEDY)[0].output
    assert llm.engine.args.media_placeholder_token_id not in out.prompt_token_ids
    assert len(out.outputs[0].token_ids) == 4


def test_image_errors_name_the_part(llm, tiny_model_dir):
    bad = [{"role": "user", "content": [{"type": "text", "text": "x"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\].content\[1\]: cannot identify"):
        llm.chat(bad, GREEDY)
    with pytest.raises(ValueError, match="2 image placeholders for 1 images"):
        cfg = ImageProcessorConfig.from_dir(llm.model_dir)
        im = load_image(encode(make_image(30, 30, seed=0)), cfg)
        pad = llm.engine.args.media_placeholder_token_id
        llm.generate([[1, pad, 2, pad]], GREEDY, images=[[im]])
    with LLM(tiny_model_dir, num_kv_blocks=64) as text_only:
        with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: image input is not supported"):
            text_only.chat(_conv(make_image(30, 30, seed=0)), GREEDY)


def test_encoder_cache_by_content_hash(llm):
    runner = llm.engine.input_processor.vision
    cfg = ImageProcessorConfig.from_dir(llm.model_dir)
    im = load_image(encode(make_image(70, 70, seed=11)), cfg)
    before = runner.images_encoded
    e1 = runner.encode([im])[0]
    e2 = runner.encode([im])[0]
    assert runner.images_encoded == before + 1 and torch.equal(e1, e2)
