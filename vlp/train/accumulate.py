"""Exact gradient accumulation for contrastive losses (GradCache) on a DeepSpeed engine.

With k micro-batches per optimizer step, plain accumulation gives each micro-batch its own
contrastive problem (negatives from that micro-batch only). Here the features of all k
micro-batches are first computed without a graph, the loss is taken on all of them at once
(distributed across ranks as usual), and each micro-batch is then forwarded again with a graph
and backpropagated with its slice of the feature gradients. The parameter gradient is then the
one of a single k-times-larger batch, at the cost of one extra forward per micro-batch.

The re-forward must see the same randomness (dropout, drop-path, patch dropout) as the first
one: the RNG state is saved before each micro-batch's first forward and restored before its
second. Everything else (ZeRO reduction, accumulation boundaries, clipping, loss scaling) is
DeepSpeed's own: each re-forward goes through `engine.backward` and `engine.step`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _rng_get() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _rng_set(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def feature_gradients(loss_fn: nn.Module, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Loss on cached features and its gradients w.r.t. the features, logit scale and bias (fp32)."""
    leaves = {"image": image.detach().float().requires_grad_(True),
              "text": text.detach().float().requires_grad_(True),
              "scale": scale.detach().float().requires_grad_(True),
              "bias": None if bias is None else bias.detach().float().requires_grad_(True)}
    with torch.enable_grad():
        loss = loss_fn(leaves["image"], leaves["text"], leaves["scale"], leaves["bias"])
        loss.backward()
    return loss.detach(), {k: None if v is None else v.grad for k, v in leaves.items()}


def exact_accumulation_step(engine, loss_fn: nn.Module,
                            micro_batches: list[tuple[torch.Tensor, ...]]) -> dict[str, Any]:
    """One optimizer step of exact accumulation over `micro_batches` (as many as the engine's
    gradient_accumulation_steps), each the engine's positional inputs (image, text[, kinds]). Collective across ranks. Returns {"loss", "logit_scale"[, "logit_bias"]}."""
    k = len(micro_batches)
    if k != engine.gradient_accumulation_steps():
        raise ValueError(f"exact accumulation got {k} micro-batches, the engine accumulates "
                         f"{engine.gradient_accumulation_steps()}")
    states, images, texts = [], [], []
    with torch.no_grad():
        for inputs in micro_batches:
            states.append(_rng_get())
            out = engine(*inputs, features_only=True)
            images.append(out["image_features"])
            texts.append(out["text_features"])
    after = _rng_get()
    scale, bias = out["logit_scale"], out.get("logit_bias")
    loss, grads = feature_gradients(loss_fn, torch.cat(images), torch.cat(texts), scale, bias)
    sizes = [x.shape[0] for x in images]
    g_img, g_txt = grads["image"].split(sizes), grads["text"].split(sizes)
    for i, inputs in enumerate(micro_batches):
        _rng_set(states[i])
        out = engine(*inputs, features_only=True)
        # a scalar whose parameter gradient is J^T g: the chain rule through the cached loss
        surrogate = (out["image_features"].float() * g_img[i]).sum() + (out["text_features"].float() * g_txt[i]).sum()
        # the temperature (and bias) enter the loss once, not once per micro-batch; the zero weight
        # elsewhere still gives them a (zero) gradient in every backward, as ZeRO expects
        w = 1.0 if i == 0 else 0.0
        surrogate = surrogate + w * (out["logit_scale"].float() * grads["scale"]).sum()
        if grads["bias"] is not None:
            surrogate = surrogate + w * (out["logit_bias"].float() * grads["bias"]).sum()
        # the cached loss already averages over all k micro-batches: no 1/k scaling here
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()
    _rng_set(after)
    metrics = {"loss": loss, "logit_scale": scale.detach()}
    if bias is not None:
        metrics["logit_bias"] = bias.detach()
    return metrics
