"""How a flat batch of new tokens maps onto sequences and the paged latent cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqSlice:
    """One sequence's share of a step: ``q_len`` new tokens at ``[q_start, q_start + q_len)`` of the flat batch.

    ``ctx_len`` counts every token of the sequence after this step (cached + new); the new tokens sit at positions
    ``ctx_len - q_len .. ctx_len - 1``. ``block_table`` lists the cache blocks that hold positions in order.
    """

    q_start: int
    q_len: int
    ctx_len: int
    block_table: torch.Tensor | None = None  # int64 [num_blocks_of_seq]


@dataclass
class AttentionMetadata:
    seqs: list[SeqSlice]
    slot_mapping: torch.Tensor | None = None  # int64 [num_tokens]: cache slot (block * block_size + offset)
    block_size: int = 16
    # Filled lazily for the batched decode path (all q_len == 1).
    _decode: dict = field(default_factory=dict, repr=False)
    # What kernels prepare once per step and reuse in every layer (e.g. the MLA decode twin's batching plan).
    step_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(s.q_len for s in self.seqs)

    @classmethod
    def prefill_only(cls, lengths: list[int]) -> "AttentionMetadata":
        """No cache: each sequence attends to its own tokens only (full recomputation, training, reference tests)."""
        seqs, start = [], 0
        for n in lengths:
            seqs.append(SeqSlice(q_start=start, q_len=n, ctx_len=n))
            start += n
        return cls(seqs=seqs)

    def decode_seqs(self) -> list[int]:
        """Indexes of the sequences with one new token and a cache: they take the batched absorbed-MLA path."""
        if "idx" not in self._decode:
            self._decode["idx"] = [i for i, s in enumerate(self.seqs) if s.q_len == 1 and s.block_table is not None]
        return self._decode["idx"]

    def decode_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the decode sequences: their flat-batch rows, padded ``block_tables [B, max_blocks]`` and
        ``context_lens [B]`` (int32)."""
        if "bt" not in self._decode:
            seqs = [self.seqs[i] for i in self.decode_seqs()]
            width = max(len(s.block_table) for s in seqs)
            bt = torch.zeros(len(seqs), width, dtype=torch.int32)
            for i, s in enumerate(seqs):
                bt[i, : len(s.block_table)] = s.block_table.to(torch.int32)
            lens = torch.tensor([s.ctx_len for s in seqs], dtype=torch.int32)
            rows = torch.tensor([s.q_start for s in seqs], dtype=torch.long)
            self._decode["bt"], self._decode["lens"] = bt.to(device), lens.to(device)
            self._decode["rows"] = rows.to(device)
        return self._decode["rows"], self._decode["bt"], self._decode["lens"]
