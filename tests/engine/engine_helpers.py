"""Helpers shared by the engine tests (imported by module name: tests/ is not a package)."""

from __future__ import annotations

import contextlib

import torch

from k2ray.runtime.step import SeqResult, StepInput, StepOutput
from k2ray.runtime.sampling import Sample


class ExecutorView:
    """The shared executor seen through a smaller cache: an engine over it uses blocks ``[0, num_kv_blocks)`` only."""

    def __init__(self, inner, num_kv_blocks: int | None = None):
        self.inner = inner
        self.args = inner.args
        self.num_attention_workers = inner.num_attention_workers
        self.block_size = inner.block_size
        self.num_kv_blocks = num_kv_blocks or inner.num_kv_blocks
        assert self.num_kv_blocks <= inner.num_kv_blocks
        self.steps = 0
        self.fail_at: int | None = None

    def execute(self, step: StepInput) -> StepOutput:
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("injected executor failure")
        for s in step.seqs:
            assert all(0 <= b < self.num_kv_blocks for b in s.block_table), s.block_table
        return self.inner.execute(step)

    def shutdown(self) -> None:
        pass


# -- a model-free executor -------------------------------------------------------------------------------------------
class FakeExecutor:
    """Stands in for the model to test paging and scheduling exactly and fast.

    It keeps a real paged "cache" of token ids per attention worker: every step writes each sequence's new tokens at the
    slots its block table names, and the next token is a hash of the whole context *read back through the block
    table*. A wrong block table, a block shared or reused while still in use, or a missing write changes (or breaks)
    the output, so equality with an unbatched reference shows the paging is right.
    """

    def __init__(self, num_attention_workers=1, num_kv_blocks=64, block_size=4, vocab=1000, eos=(999,),
                 max_position_embeddings=4096):
        self.num_attention_workers = num_attention_workers
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.args = _FakeArgs(vocab, list(eos), max_position_embeddings)
        self.cache = [[-1] * (num_kv_blocks * block_size) for _ in range(num_attention_workers)]
        self.steps: list[StepInput] = []
        self.computed_tokens = 0

    def execute(self, step: StepInput) -> StepOutput:
        self.steps.append(step)
        out = StepOutput()
        bs = self.block_size
        for s in step.seqs:
            cache = self.cache[s.attention_rank]
            end = s.start_pos + len(s.token_ids)
            assert len(s.block_table) * bs >= end
            assert len(set(s.block_table)) == len(s.block_table)
            for i, t in enumerate(s.token_ids):
                pos = s.start_pos + i
                cache[s.block_table[pos // bs] * bs + pos % bs] = t
            self.computed_tokens += len(s.token_ids)
            r = SeqResult(seq_id=s.seq_id)
            if s.sample is not None:
                ctx = [cache[s.block_table[p // bs] * bs + p % bs] for p in range(end)]
                assert -1 not in ctx, "read an unwritten cache slot"
                r.sample = Sample(token_id=fake_next_token(ctx, self.args.vocab_size), logprob=-1.0)
            out.results[s.seq_id] = r
        return out

    def shutdown(self) -> None:
        pass


class _FakeArgs:
    def __init__(self, vocab, eos, max_pos):
        self.vocab_size = vocab
        self.eos_token_ids = eos
        self.max_position_embeddings = max_pos


def fake_next_token(ctx: list[int], vocab: int) -> int:
    h = 0
    for t in ctx:
        h = (h * 1_000_003 + t + 1) % (1 << 61)
    return h % (vocab - 1)  # never the fake EOS (vocab - 1)


def fake_reference(prompt: list[int], max_tokens: int, vocab: int = 1000) -> list[int]:
    ctx = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = fake_next_token(ctx, vocab)
        out.append(t)
        ctx.append(t)
    return out


def run_to_completion(engine, max_steps: int = 100_000) -> dict:
    """Step until no request is left; the final output of each request that finished, by id."""
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("engine did not finish")


@contextlib.contextmanager
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
