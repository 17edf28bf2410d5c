"""CLIP BPE tokenizer wrapper around open_clip's offline `SimpleTokenizer` (vocab ships in the wheel).

Wrapping rather than reimplementing guarantees ids identical to `open_clip.get_tokenizer('ViT-B-32')`,
which is what makes open_clip checkpoints usable with vlp.

`open_clip/tokenizer.py` imports only ftfy, regex, numpy and torch, but `import open_clip.tokenizer`
runs the package's `__init__` first, which builds all of open_clip's models and imports transformers:
about 1.8 s of every process start (each rank, each `python -m vlp...` command). So the module is
loaded from open_clip's own file, under a private name, without the package. If the installed
open_clip lays its files out otherwise, the plain import is used.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Protocol

import torch


def _open_clip_tokenizer_module():
    name = "vlp._open_clip_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    paths = list(spec.submodule_search_locations or []) if spec is not None else []
    file = next((Path(p) / "tokenizer.py" for p in paths if (Path(p) / "tokenizer.py").is_file()), None)
    if file is None:
        import open_clip.tokenizer as module

        return module
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


SimpleTokenizer = _open_clip_tokenizer_module().SimpleTokenizer
if SimpleTokenizer.__module__ != "open_clip.tokenizer":
    # pickle names a class by its module: name this one, which any process can import, so that a pickled
    # tokenizer loads in a spawned worker (the private module exists only once this one has run)
    SimpleTokenizer.__module__ = __name__


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
