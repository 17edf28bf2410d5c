"""CLIP BPE tokenizer wrapper around open_clip's offline `SimpleTokenizer` (vocab ships in the wheel).

Wrapping rather than reimplementing guarantees ids identical to `open_clip.get_tokenizer('ViT-B-32')`,
which is what makes open_clip checkpoints usable with vlp.
"""

from __future__ import annotations

from typing import Protocol

import torch
from open_clip.tokenizer import SimpleTokenizer


class TextSettings(Protocol):
    """What a tokenizer needs to know of a text tower (vlp.models.config.TextTowerConfig has it)."""

    context_length: int
    vocab_size: int
    eot_token_id: int


class Tokenizer:
    """`tok(texts) -> LongTensor[N, context_length]`: sot + BPE + eot, zero padded, truncated keeping eot last."""

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
        self._tok = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_size: int = self._tok.vocab_size
        self.sot_token_id: int = self._tok.sot_token_id
        self.eot_token_id: int = self._tok.eot_token_id
        self.pad_token_id = 0

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        return self._tok(list(texts), context_length=self.context_length)

    def encode(self, text: str) -> list[int]:
        """BPE ids without sot/eot or padding."""
        return self._tok.encode(text)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text for one row of ids, stopping at eot and skipping sot/padding."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out: list[int] = []
        for i in ids:
            if i == self.eot_token_id:
                break
            if i not in (self.sot_token_id, self.pad_token_id):
                out.append(i)
        return self._tok.decode(out).strip()

    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """The BPE tables: token -> id (the byte-level alphabet, its `</w>` forms, the merges' results,
        then sot and eot), and the merges in rank order - what a byte-level BPE tokenizer of another
        library (transformers' CLIPTokenizer) needs to give the same ids."""
        vocab = dict(self._tok.encoder)
        merges = sorted(self._tok.bpe_ranks, key=self._tok.bpe_ranks.__getitem__)
        return vocab, merges

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length}, vocab_size={self.vocab_size})"


def get_tokenizer(cfg: TextSettings) -> Tokenizer:
    """Tokenizer matching a text tower; refuses configs whose vocab or eot id disagree with the BPE."""
    tok = Tokenizer(cfg.context_length)
    if cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"text vocab_size {cfg.vocab_size} < tokenizer vocab size {tok.vocab_size}")
    if cfg.eot_token_id != tok.eot_token_id:
        raise ValueError(f"text eot_token_id {cfg.eot_token_id} != tokenizer eot id {tok.eot_token_id}")
    return tok
