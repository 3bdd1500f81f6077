"""The core check of Kimi K2.5 image input: k2ray's engine (LLM.chat with data-URL images) against transformers'
``Kimi_K25ForConditionalGeneration`` loaded from a converted copy of the same tiny checkpoint (released layout):
equal prompt token counts, greedy tokens, and chosen-token logprobs within 2e-3.

transformers' image processor needs torchvision (not installed): transformers' model gets k2ray's pixel values, and
k2ray's preprocessing is checked against the released rule in test_image_preprocess.py.
"""

import pytest
import torch

from k2ray.llm import LLM
from k2ray.runtime.sampling import SamplingParams
from k2ray.tokenizer.chat import ChatTemplate
from k2ray.tokenizer.image import ImageProcessorConfig, load_image

from .images import data_url, encode, make_image, released_preprocess

MAX_TOKENS = 6
A = encode(make_image(100, 70, seed=1))  # no resize: 7x5 patches, padded to 8x6
B = encode(make_image(500, 300, seed=2))  # over the tiny patch budget: resized to 295x177, padded
C = encode(make_image(84, 56, seed=3), "JPEG", quality=90)  # exactly 6x4 patches: no padding


def _img(data, mime="image/png"):
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


CONVERSATIONS = {
    "one_image": [{"role": "user", "content": [_img(A), {"type": "text", "text": "What is in this picture?"}]}],
    "two_images": [{"role": "user", "content": [_img(B), {"type": "text", "text": "and"}, _img(A),
                                                 {"type": "text", "text": "which is larger?"}]}],
    "image_and_text": [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": "Hello there, I will show you something."},
        {"role": "assistant", "content": "Please do."},
        {"role": "user", "content": [{"type": "text", "text": "Here:"}, _img(C, "image/jpeg"),
                                     {"type": "text", "text": "Describe it in one word."}]},
    ],
}


@pytest.fixture(scope="module")
def llm(k25_dir):
    with LLM(k25_dir, num_kv_blocks=256, block_size=16) as llm:
        yield llm


def _hf_greedy(hf, ids, pixel_values, grids, steps):
    """Greedy decoding by full recomputation: tokens and each chosen token's logprob."""
    ids = list(ids)
    thw = torch.tensor([[1, h, w] for h, w in grids])
    toks, lps = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(input_ids=torch.tensor([ids]), pixel_values=pixel_values, image_grid_thw=thw).logits[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            t = int(lp.argmax())
            toks.append(t)
            lps.append(float(lp[t]))
            ids.append(t)
    return toks, lps


def _expected_prompt(k25_dir, llm, conv, raw_images):
    """transformers' way of building the prompt: render the template (one <|media_pad|> per image), tokenize with
    the template's specials, expand each placeholder by the released rule's token count."""
    tok = llm.tokenizer
    text = ChatTemplate.from_dir(k25_dir, tok).render(conv)
    ids = tok.encode(text, allow_special=True)
    pad = llm.engine.args.media_placeholder_token_id
    counts = iter(released_preprocess(__import__("PIL.Image").Image.open(__import__("io").BytesIO(d)))[1]
                  for d in raw_images)
    out = []
    for t in ids:
        out.extend([pad] * next(counts) if t == pad else [t])
    return out


@pytest.mark.parametrize("name,raw", [("one_image", [A]), ("two_images", [B, A]), ("image_and_text", [C])])
def test_greedy_tokens_and_logprobs_equal_transformers(llm, hf_k25, k25_dir, name, raw):
    conv = CONVERSATIONS[name]
    out = llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True))[0]
    got = out.output.outputs[0]
    prompt = out.output.prompt_token_ids
    assert prompt == _expected_prompt(k25_dir, llm, conv, raw)

    cfg = ImageProcessorConfig.from_dir(k25_dir)
    images = [load_image(d, cfg) for d in raw]
    pad = llm.engine.args.media_placeholder_token_id
    assert sum(t == pad for t in prompt) == sum(im.num_tokens for im in images)
    pixels = torch.cat([im.pixel_values for im in images])
    toks, lps = _hf_greedy(hf_k25, prompt, pixels, [im.grid for im in images], MAX_TOKENS)
    assert got.token_ids == toks
    ours = [lp[t] for lp, t in zip(got.logprobs, got.token_ids)]
    assert max(abs(a - b) for a, b in zip(ours, lps)) < 2e-3


def test_images_change_the_output(llm, hf_k25):
    """Not trivially equal: the image embeddings reach the logits (another image, other logits)."""
    p = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    conv = lambda img: [{"role": "user", "content": [_img(img), {"type": "text", "text": "?"}]}]  # noqa: E731
    a = llm.chat(conv(A), p)[0].output.outputs[0].logprobs[0]
    c = llm.chat(conv(encode(make_image(100, 70, seed=9))), p)[0].output.outputs[0].logprobs[0]
    assert a != c
