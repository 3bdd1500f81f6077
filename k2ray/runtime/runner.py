"""Runs one attention worker's share of a step: flatten, forward through the paged cache, sample.

Shared by the local executor and the Ray attention worker, so both run exactly the same code.

Sampling is per row (a row's token depends on that row only), so when the batched sampler raises, the rows are sampled
one by one and only the rows that still raise fail: their :class:`~k2ray.runtime.step.SeqResult` carries no sample,
which the engine answers by failing that one request. The model step itself has no such rows: if it raises, the step
fails as a whole.
"""

from __future__ import annotations

import logging

import torch

from k2ray.runtime.sampling import Sample, SampleRequest, sample
from k2ray.runtime.step import SeqResult, SeqWork
from k2ray.model.attention_metadata import AttentionMetadata, SeqSlice
from k2ray.model.model import KimiK2ForCausalLM

log = logging.getLogger(__name__)

# Test-only fault injection: sampling raises for the rows of these sequence ids (tests/engine/test_isolation.py).
# Empty in production; nothing else reads it.
FAIL_SAMPLING_FOR_SEQ_IDS: set[int] = set()


class ModelRunner:
    def __init__(self, model: KimiK2ForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu"):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        a = model.args
        self.kv_caches = [
            torch.zeros(num_blocks, block_size, a.kv_cache_dim, dtype=dtype, device=self.device)
            for _ in range(a.num_hidden_layers)
        ]

    @torch.inference_mode()
    def execute(self, seqs: list[SeqWork]) -> list[SeqResult]:
        ids, positions, slots, slices = [], [], [], []
        override_rows: list[torch.Tensor] = []
        override_embeds: list[torch.Tensor] = []
        bs = self.block_size
        for s in seqs:
            n = len(s.token_ids)
            if n == 0:
                raise ValueError(f"sequence {s.seq_id}: empty step")
            ctx = s.start_pos + n
            if len(s.block_table) * bs < ctx:
                raise ValueError(f"sequence {s.seq_id}: {len(s.block_table)} blocks cannot hold {ctx} tokens")
            table = torch.tensor(s.block_table, dtype=torch.long)
            pos = torch.arange(s.start_pos, ctx)
            for offset, rows in s.embeds:
                if offset < 0 or offset + rows.shape[0] > n:
                    raise ValueError(f"sequence {s.seq_id}: embeddings for [{offset}, {offset + rows.shape[0]}) "
                                     f"outside its {n} new tokens")
                override_rows.append(torch.arange(len(ids) + offset, len(ids) + offset + rows.shape[0]))
                override_embeds.append(rows)
            slices.append(SeqSlice(q_start=len(ids), q_len=n, ctx_len=ctx, block_table=table))
            ids.extend(s.token_ids)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
        dev = self.device
        if seqs:
            input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
            pos_t = torch.cat(positions).to(dev)
            slot_t = torch.cat(slots).to(dev)
        else:  # still run: expert parallelism needs every worker in every collective
            input_ids = torch.empty(0, dtype=torch.long, device=dev)
            pos_t = torch.empty(0, dtype=torch.long, device=dev)
            slot_t = torch.empty(0, dtype=torch.long, device=dev)
        meta = AttentionMetadata(seqs=slices, slot_mapping=slot_t, block_size=bs)
        override = None
        if override_rows:
            override = (torch.cat(override_rows).to(dev), torch.cat(override_embeds).to(dev))
        hidden = self.model(input_ids, pos_t, meta, self.kv_caches, embed_override=override)

        results = [SeqResult(seq_id=s.seq_id) for s in seqs]
        rows = [sl.q_start + sl.q_len - 1 for s, sl in zip(seqs, slices) if s.sample is not None]
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])
            samples = iter(_sample_isolated(logits, [s for s in seqs if s.sample is not None]))
            for s, r in zip(seqs, results):
                if s.sample is not None:
                    r.sample = next(samples)
        for s, sl, r in zip(seqs, slices, results):
            if s.prompt_logprobs is not None:
                r.prompt_logprobs = self._prompt_logprobs(hidden[sl.q_start : sl.q_start + sl.q_len], s)
        return results

    def _prompt_logprobs(self, hidden: torch.Tensor, s: SeqWork):
        targets = list(s.token_ids[1:]) + ([s.next_prompt_token] if s.next_prompt_token is not None else [])
        if not targets:
            return []
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[: len(targets)]).float(), dim=-1)
        k = s.prompt_logprobs or 0
        out = []
        for row, t in zip(logprobs, targets):
            top = []
            if k:
                vals, idx = torch.topk(row, k)
                top = list(zip(idx.tolist(), vals.tolist()))
            out.append((float(row[t]), top))
        return out


def _sample_one_batch(logits: torch.Tensor, works: list[SeqWork]) -> list[Sample]:
    bad = next((w.seq_id for w in works if w.seq_id in FAIL_SAMPLING_FOR_SEQ_IDS), None)
    if bad is not None:
        raise RuntimeError(f"injected sampling failure for sequence {bad}")
    reqs: list[SampleRequest] = [w.sample for w in works]
    return sample(logits, reqs)


def _sample_isolated(logits: torch.Tensor, works: list[SeqWork]) -> list[Sample | None]:
    """One sample per row; None for a row whose sampling raises (the other rows are unaffected)."""
    try:
        return _sample_one_batch(logits, works)
    except Exception:
        log.warning("batched sampling raised; sampling %d rows one by one", len(works), exc_info=True)
    out: list[Sample | None] = []
    for i, w in enumerate(works):
        try:
            out.append(_sample_one_batch(logits[i : i + 1], [w])[0])
        except Exception:
            log.exception("sampling sequence %d raised; only its request fails", w.seq_id)
            out.append(None)
    return out
