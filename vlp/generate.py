"""Caption generation for CoCa models: greedy, beam search, top-k and top-p (nucleus) sampling.

    out = vlp.generate(model, images, tokenizer, method="beam", num_beams=4, max_len=16)
    out.texts      # ["a photo of a sneaker.", ...]
    out.tokens     # [B, L] ids: sot ... eot, then padding

Greedy and sampling decode one position per step with a key-value cache (`use_cache=False`
re-runs the whole prefix instead; beam search always does); the image tokens, and the decoder's
cross-attention keys and values, are computed once. `max_len` counts every token, sot and eot included,
and may not exceed the text tower's context length. A caption that reaches `max_len` without eot
ends there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.families import require

METHODS = ("greedy", "beam", "top_k", "top_p")


@dataclass
class Generated:
    tokens: torch.Tensor  # [B, L] token ids (sot first, eot where the caption ended, then padding)
    texts: list[str]


class _Stepper:
    """Next-token log-probabilities over output classes for a batch of prefixes."""

    def __init__(self, model: nn.Module, image_tokens: torch.Tensor, eot_id: int) -> None:
        self.model = model
        self.decoder = model.decoder
        self.image_tokens = image_tokens
        self.allowed = self.decoder.allowed_classes()
        self.eot_class = int(self.decoder.token_to_class(torch.tensor(eot_id, device=image_tokens.device)))

    def logits(self, prefix: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        img = self.image_tokens if rows is None else self.image_tokens[rows]
        logits = self.model.caption_logits(prefix, img)[:, -1].float()
        return logits.masked_fill(~self.allowed, float("-inf"))

    def to_token(self, classes: torch.Tensor) -> torch.Tensor:
        return self.decoder.class_to_token(classes)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class _KVCache:
    """Incremental decoding: one new position per step through the text tower and the decoder, with the
    keys and values of earlier positions kept per self-attention layer and the cross-attention keys and
    values of the image tokens computed once. Equals re-running the prefix (`_Stepper`), because every
    self-attention here is causal and a generated prefix has no padding."""

    def __init__(self, stepper: _Stepper, batch: int) -> None:
        model = stepper.model
        self.stepper, self.text, self.decoder = stepper, model.text, model.decoder
        self.past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * (
            len(self.text.blocks) + len(self.decoder.self_blocks))
        self.cross = [self._cross_kv(blk, stepper.image_tokens) for blk in self.decoder.cross_blocks]
        self.pos = 0

    @staticmethod
    def _qkv_weights(mha: nn.MultiheadAttention) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ws = mha.in_proj_weight.chunk(3) if mha.in_proj_weight is not None else [
            mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        return list(ws), list(mha.in_proj_bias.chunk(3))

    def _cross_kv(self, blk: nn.Module, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = blk.norm_kv(image_tokens)
        (_, wk, wv), (_, bk, bv) = self._qkv_weights(blk.attn)
        h = blk.attn.num_heads
        return _heads(F.linear(kv, wk, bk), h), _heads(F.linear(kv, wv, bv), h)

    def _self_block(self, blk: nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(x)).chunk(3, dim=-1)
        q, k, v = (_heads(t, a.num_heads) for t in (q, k, v))
        q, k = a.q_norm(q), a.k_norm(k)
        if self.past[i] is not None:
            k, v = torch.cat([self.past[i][0], k], dim=2), torch.cat([self.past[i][1], v], dim=2)
        self.past[i] = (k, v)
        x = x + blk.ls1(a.proj(a.norm(_merge(F.scaled_dot_product_attention(q, k, v)))))
        return x + blk.ls2(blk.mlp(blk.norm2(x)))

    def _cross_block(self, blk: nn.Module, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        (wq, _, _), (bq, _, _) = self._qkv_weights(blk.attn)
        q = _heads(F.linear(blk.norm1(x), wq, bq), blk.attn.num_heads)
        x = x + blk.attn.out_proj(_merge(F.scaled_dot_product_attention(q, *kv)))
        return x + blk.mlp(blk.norm2(x))

    def logits(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Masked next-token logits [B, classes] after appending `new_tokens` [B] to every row."""
        x = self.text.token_embedding(new_tokens[:, None]) + self.text.positional_embedding[self.pos]
        i = 0
        for blk in self.text.blocks:
            x, i = self._self_block(blk, x, i), i + 1
        for sblk, xblk, kv in zip(self.decoder.self_blocks, self.decoder.cross_blocks, self.cross):
            x, i = self._self_block(sblk, x, i), i + 1
            x = self._cross_block(xblk, x, kv)
        self.pos += 1
        logits = self.decoder.head(self.decoder.ln_final(x))[:, -1].float()
        return logits.masked_fill(~self.stepper.allowed, float("-inf"))


def _filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top_k largest logits and/or the smallest set whose probability reaches top_p."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the best is always kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _decode_steps(stepper: _Stepper, sot: torch.Tensor, max_len: int, pad_id: int, eot_id: int,
                  pick, use_cache: bool = False) -> torch.Tensor:
    """Greedy / sampling loop: `pick(logits) -> classes`; finished rows are padded.

    With `use_cache` every row takes one cached step per token (finished rows' outputs are dropped);
    without, the live rows' prefixes are re-run in full."""
    seqs = sot
    done = torch.zeros(sot.shape[0], dtype=torch.bool, device=sot.device)
    cache = _KVCache(stepper, sot.shape[0]) if use_cache else None
    while seqs.shape[1] < max_len and not done.all():
        live = (~done).nonzero().squeeze(1)
        nxt = torch.full_like(done, pad_id, dtype=torch.long)
        logits = cache.logits(seqs[:, -1])[live] if cache is not None else stepper.logits(seqs[live], live)
        nxt[live] = stepper.to_token(pick(logits))
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eot_id
    return seqs


def _beam_search(stepper: _Stepper, sot: torch.Tensor, max_len: int, pad_id: int, eot_id: int,
                 num_beams: int, length_penalty: float) -> torch.Tensor:
    """Beam search; an image is done once it has `num_beams` finished captions (eot generated), and
    the best of them by sum log-prob / length**length_penalty is returned."""
    b, k = sot.shape[0], num_beams
    device = sot.device
    seqs = sot.repeat_interleave(k, dim=0)  # [B*K, t]
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # identical beams at the start: expand only the first
    rows = torch.arange(b, device=device).repeat_interleave(k)
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(b)]

    def norm(score: float, length: int) -> float:
        return score / (length ** length_penalty)

    while seqs.shape[1] < max_len:
        logp = stepper.logits(seqs, rows).log_softmax(dim=-1)  # [B*K, C]
        n_cls = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(b, k * n_cls)
        cand_scores, cand = total.topk(min(2 * k, k * n_cls), dim=-1)
        new_seqs, new_scores = [], torch.full((b, k), float("-inf"), device=device)
        for i in range(b):
            chosen: list[torch.Tensor] = []
            if len(finished[i]) < k:
                for s, c in zip(cand_scores[i].tolist(), cand[i].tolist()):
                    if s == float("-inf"):
                        break
                    beam, cls = divmod(c, n_cls)
                    seq = torch.cat([seqs[i * k + beam], stepper.to_token(torch.tensor([cls], device=device))])
                    if cls == stepper.eot_class:
                        finished[i].append((norm(s, seq.numel() - 1), seq))
                        if len(finished[i]) >= k:
                            break
                        continue
                    new_scores[i, len(chosen)] = s
                    chosen.append(seq)
                    if len(chosen) == k:
                        break
            while len(chosen) < k:  # done image (or too few candidates): inert filler beams
                chosen.append(torch.cat([seqs[i * k], seqs.new_full((1,), pad_id)]))
            new_seqs.extend(chosen)
        seqs, scores = torch.stack(new_seqs), new_scores
        if all(len(f) >= k for f in finished):
            break
    out = []
    for i in range(b):
        hyps = list(finished[i])
        if len(hyps) < k:  # max_len reached: the live beams count as captions too
            hyps += [(norm(float(scores[i, j]), seqs.shape[1] - 1), seqs[i * k + j])
                     for j in range(k) if scores[i, j] > float("-inf")]
        out.append(max(hyps, key=lambda h: h[0])[1])
    width = max(s.numel() for s in out)
    return torch.stack([torch.cat([s, s.new_full((width - s.numel(),), pad_id)]) for s in out])


@torch.no_grad()
def generate(model: nn.Module, images: torch.Tensor, tokenizer, method: str = "greedy", max_len: int | None = None,
             num_beams: int = 4, length_penalty: float = 1.0, top_k: int = 50, top_p: float = 0.9,
             temperature: float = 1.0, generator: torch.Generator | None = None,
             use_cache: bool = True) -> Generated:
    """Captions for a batch of preprocessed `images` [B, 3, H, W] from a CoCa model.

    `use_cache`: greedy and sampling decode one position per step with cached keys and values
    (beam search always re-runs the prefixes)."""
    require(model, "captioning", "generate")
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    ctx = model.text.context_length
    max_len = ctx if max_len is None else max_len
    if not 2 <= max_len <= ctx:
        raise ValueError(f"max_len must be in [2, {ctx}] (the text context length), got {max_len}")
    if method == "beam" and num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        images = images.to(param.device, param.dtype)
        stepper = _Stepper(model, model.image_tokens(images)[1], tokenizer.eot_token_id)
        sot = torch.full((images.shape[0], 1), tokenizer.sot_token_id, dtype=torch.long, device=param.device)
        pad, eot = tokenizer.pad_token_id, tokenizer.eot_token_id
        if method == "beam":
            tokens = _beam_search(stepper, sot, max_len, pad, eot, num_beams, length_penalty)
        elif method == "greedy":
            tokens = _decode_steps(stepper, sot, max_len, pad, eot, lambda lg: lg.argmax(dim=-1), use_cache)
        else:
            kw = {"top_k": top_k} if method == "top_k" else {"top_p": top_p}

            def sample(lg: torch.Tensor) -> torch.Tensor:
                probs = _filter(lg / temperature, **kw).softmax(dim=-1)
                return torch.multinomial(probs, 1, generator=generator).squeeze(1)

            tokens = _decode_steps(stepper, sot, max_len, pad, eot, sample, use_cache)
    finally:
        model.train(was_training)
    return Generated(tokens=tokens.cpu(), texts=[tokenizer.decode(row) for row in tokens.cpu()])
