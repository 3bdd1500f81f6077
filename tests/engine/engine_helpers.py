"""Helpers shared by the engine tests (imported by module name: tests/ is not a package)."""

from __future__ import annotations

from k2ray.executor.base import SeqResult, StepInput, StepOutput
from k2ray.engine.sampling import Sample


# -- a model-free executor -------------------------------------------------------------------------------------------
class FakeExecutor:
    """Stands in for the model to test paging and scheduling exactly and fast.

    It keeps a real paged "cache" of token ids per partition: every step writes each sequence's new tokens at the
    slots its block table names, and the next token is a hash of the whole context *read back through the block
    table*. A wrong block table, a block shared or reused while still in use, or a missing write changes (or breaks)
    the output, so equality with an unbatched reference shows the paging is right.
    """

    def __init__(self, num_partitions=1, num_kv_blocks=64, block_size=4, vocab=1000, eos=(999,),
                 max_position_embeddings=4096):
        self.num_partitions = num_partitions
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.args = _FakeArgs(vocab, list(eos), max_position_embeddings)
        self.cache = [[-1] * (num_kv_blocks * block_size) for _ in range(num_partitions)]
        self.steps: list[StepInput] = []
        self.computed_tokens = 0

    def execute(self, step: StepInput) -> StepOutput:
        self.steps.append(step)
        out = StepOutput()
        bs = self.block_size
        for s in step.seqs:
            cache = self.cache[s.partition]
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
