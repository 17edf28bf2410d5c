"""Prefix Conditioning: a learned token per data kind after start-of-text (vlp/models/text.py).

References: the plain text tower of the same weights reading the prefix as an ordinary extra
token (hand-built embedding table and positions), a hand-run of the blocks, and models built
without prefixes at the same seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlp.eval.common import make_context, text_prefix
from vlp.eval.tasks import DatasetSpec
from vlp.eval.zeroshot import build_classifier
from vlp.eval.zeroshot import evaluate as zeroshot_evaluate
from vlp.models import create_model
from vlp.models.config import TextTowerConfig
from vlp.models.text import TextTower

SOT, EOT = 49406, 49407
KINDS = ["caption", "label", "alt"]


def nano(prefix: list[str] | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("clip-nano", **({"text": {"prefix_kinds": prefix}} if prefix else {})).eval()


def tokens(lengths: list[int], context: int = 16) -> torch.Tensor:
    """sot + random words + eot + zero padding, one row per length (number of words)."""
    g = torch.Generator().manual_seed(1)
    out = torch.zeros(len(lengths), context, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0] = SOT
        out[i, 1:n + 1] = torch.randint(1, 1000, (n,), generator=g)
        out[i, n + 1] = EOT
    return out


def test_without_prefixes_the_model_is_unchanged_and_shared_init_is_equal() -> None:
    plain, pref = nano(), nano(KINDS)
    a, b = plain.state_dict(), pref.state_dict()
    assert set(b) - set(a) == {"text.prefix_embedding"} and b["text.prefix_embedding"].shape == (3, 64)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the prefix draw does not shift the other inits
    assert plain.text.prefix_embedding is None and "prefix" not in " ".join(a)
    # the plain tower's forward is the unprefixed computation: embeddings + positions -> causal blocks
    t = tokens([3, 7, 14])
    x = plain.text.token_embedding(t) + plain.text.positional_embedding[:16]
    for blk in plain.text.blocks:
        x = blk(x, is_causal=True)
    ref = plain.text.ln_final(x)[torch.arange(3), torch.tensor([4, 8, 15])]
    torch.testing.assert_close(plain.text(t), ref)


def test_prefix_is_a_token_after_sot_and_pooling_stays_at_eot() -> None:
    """Reference: a plain tower over the vocab + one id per kind and context + 1, whose positional
    table is the prefixed tower's with a zero row at index 1 (the prefix has no position), fed
    [sot, kind id, words...]. Its end-of-text output must equal the prefixed tower's."""
    cfg = TextTowerConfig(context_length=16, vocab_size=1000 + 1 + 2, width=32, heads=2, layers=2,
                          eot_token_id=1002, prefix_kinds=tuple(KINDS))
    torch.manual_seed(0)
    tower = TextTower(cfg).eval()
    ref = TextTower(TextTowerConfig(context_length=17, vocab_size=cfg.vocab_size + 3, width=32, heads=2,
                                    layers=2, eot_token_id=1002)).eval()
    with torch.no_grad():
        ref.blocks.load_state_dict(tower.blocks.state_dict())
        ref.ln_final.load_state_dict(tower.ln_final.state_dict())
        ref.token_embedding.weight.copy_(torch.cat([tower.token_embedding.weight, tower.prefix_embedding]))
        pos = tower.positional_embedding
        ref.positional_embedding.copy_(torch.cat([pos[:1], torch.zeros(1, 32), pos[1:]]))
    t = torch.zeros(4, 16, dtype=torch.long)
    for i, n in enumerate([0, 3, 9, 14]):  # 14 words: eot at the last token position
        t[i, 0], t[i, 1:n + 1], t[i, n + 1] = 1001, torch.arange(n) * 7 + 5, 1002
    kinds = ["label", "caption", "alt", "label"]
    ids = torch.tensor([KINDS.index(k) for k in kinds])
    t_ref = torch.cat([t[:, :1], (cfg.vocab_size + ids)[:, None], t[:, 1:]], dim=1)
    torch.testing.assert_close(tower(t, kinds), ref(t_ref))
    torch.testing.assert_close(tower(t, ids), ref(t_ref))  # indices work like names
    # per-position outputs are those of the token positions (the prefix position is dropped)
    torch.testing.assert_close(tower.forward_tokens(t, kinds), torch.cat([ref.forward_tokens(t_ref)[:, :1],
                                                                          ref.forward_tokens(t_ref)[:, 2:]], 1))


def test_only_the_kind_changes_the_embedding() -> None:
    model = nano(KINDS)
    t = tokens([3, 5, 8])
    with torch.no_grad():
        cap, lab = model.encode_text(t, kinds="caption"), model.encode_text(t, kinds="label")
        mixed = model.encode_text(t, kinds=["label", "caption", "label"])
        default = model.encode_text(t)  # no kind: caption
        per_pos = [model.text.forward_tokens(t, k) for k in ("caption", "label")]
    assert (cap - lab).abs().amax(dim=1).min() > 1e-3  # every row moves with the kind
    torch.testing.assert_close(mixed, torch.stack([lab[0], cap[1], lab[2]]))
    torch.testing.assert_close(default, cap)
    torch.testing.assert_close(per_pos[0][:, 0], per_pos[1][:, 0])  # causal: sot never sees the prefix
    assert (per_pos[0][:, 1:] - per_pos[1][:, 1:]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match=r"unknown text kind\(s\) \['photo'\].*caption, label, alt"):
        model.encode_text(t, kinds="photo")
    with pytest.raises(ValueError, match="2 text kinds for a batch of 3"):
        model.encode_text(t, kinds=["label", "caption"])
    with pytest.raises(ValueError, match="index out of range"):
        model.encode_text(t, kinds=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="no prefix conditioning"):
        nano().encode_text(t, kinds="label")
    with pytest.raises(ValueError, match="distinct non-empty"):
        create_model("clip-nano", text={"prefix_kinds": ["label", "label"]})
    with pytest.raises(ValueError, match="prefix conditioning is implemented for the CLIP text tower"):
        create_model("coca-nano", text={"prefix_kinds": ["caption"]})


def test_gradients_reach_only_the_prefixes_of_kinds_in_the_batch() -> None:
    model = nano(KINDS).train()
    t = tokens([2, 4, 6, 3])
    images = torch.randn(4, 3, 16, 16)
    out = model(images, t, torch.tensor([1, 1, 2, 1]))  # label and alt; no caption
    (out["image_features"] @ out["text_features"].t()).logsumexp(1).sum().backward()
    g = model.text.prefix_embedding.grad
    assert torch.equal(g[0], torch.zeros_like(g[0])) and g[1].abs().sum() > 0 and g[2].abs().sum() > 0
    assert "text.prefix_embedding" in model.no_weight_decay()


def test_eval_prefix_mode_default_switch_and_refusals() -> None:
    from vlp.data.tokenizer import get_tokenizer

    model, plain = nano(["caption", "label"]), nano()
    assert text_prefix(model, {}) == "caption" and text_prefix(model, {"prefix": "label"}) == "label"
    assert text_prefix(plain, {}) is None
    with pytest.raises(ValueError, match="prefix='alt': not a prefix kind of this model"):
        text_prefix(model, {"prefix": "alt"})
    with pytest.raises(ValueError, match="prefix='label': this model has no prefix conditioning"):
        text_prefix(plain, {"prefix": "label"})
    tok = get_tokenizer(model.config.text)
    ctx = make_context("cpu", figures=False)
    res = {k: zeroshot_evaluate(model, tok, model.preprocess,
                                DatasetSpec("digits", max_samples=60, options={} if k is None else {"prefix": k}),
                                ctx) for k in (None, "caption", "label")}
    assert [r.details["text_prefix"] for r in res.values()] == ["caption", "caption", "label"]
    assert res[None].metrics == res["caption"].metrics
    names, templates = ["zero", "one"], ["a photo of {}.", "the number {}."]
    lab = build_classifier(model, tok, names, templates, kind="label")
    cap = build_classifier(model, tok, names, templates, kind="caption")
    with torch.no_grad():  # the label classifier is the mean of label-prefixed prompt embeddings
        e = model.encode_text(tok([t.format(n) for n in names for t in templates]), normalize=True, kinds="label")
    torch.testing.assert_close(lab, torch.nn.functional.normalize(e.view(2, 2, -1).mean(1), dim=-1))
    assert (lab - cap).abs().max() > 1e-4


def test_export_refuses_prefix_models(tmp_path: Path) -> None:
    from vlp.interop.hf import export_hf
    from vlp.interop.open_clip import export_open_clip

    torch.manual_seed(0)
    model = create_model("ViT-B-32", text={"prefix_kinds": ["caption", "label"], "layers": 1},
                         vision={"timm_kwargs": {"depth": 1}})
    for fn in (export_open_clip, export_hf):
        with pytest.raises(ValueError, match=r"prefix-conditioned \(text.prefix_kinds=\['caption', 'label'\]\)"):
            fn(model.config, model.state_dict(), tmp_path / fn.__name__)


def test_source_prefix_not_among_the_model_kinds_is_named(digits_shards_dir: Path, tmp_path: Path) -> None:
    from vlp.config import load_config
    from vlp.train.trainer import Trainer, TrainError

    base = [f"run_dir={tmp_path}/r",
            f"data.sources=[{{name: digits, shards: {digits_shards_dir}/train.json, prefix: web}}]"]
    cfg = load_config("tests/configs/digits_nano.yaml", base + ["model.overrides={text: {prefix_kinds: [caption]}}"])
    with pytest.raises(TrainError, match=r"data.sources\[0\].prefix: .*'digits' take prefix 'web'.*\['caption'\]"):
        Trainer(cfg)
    cfg = load_config("tests/configs/digits_nano.yaml", base)
    with pytest.raises(TrainError, match=r"data.sources\[0\].prefix='web' but model 'clip-nano' has no prefix"):
        Trainer(cfg)


@pytest.mark.slow
def test_torchrun_deepspeed_prefix_mixture_trains_and_resumes(digits_shards_dir: Path, tmp_path: Path) -> None:
    """2 ranks, ZeRO-1, a caption source and a label source with their own prefixes: stopped after 3
    steps, resumed to 6; both used prefixes trained, the unused one untouched, evals in both modes."""
    from safetensors.torch import load_file

    from tests.helpers import torchrun
    from vlp.data.build import build_shards
    from vlp.loading import load_state

    labels = tmp_path / "labels"
    build_shards("digits", labels, split="test", shard_size=100, seed=0)
    run_dir = tmp_path / "run"
    args = ["train.py", "--config", "tests/configs/digits_nano.yaml", f"run_dir={run_dir}",
            f"data.sources=[{{name: cap, shards: {digits_shards_dir}/train.json}}, "
            f"{{name: lab, shards: {labels}/test.json, kind: label, classnames_from: digits}}]",
            "model.overrides={text: {prefix_kinds: [caption, label, unused]}}", "data.batch_size=20",
            "data.workers=1", "train.steps=6", "train.checkpoint_every_n_steps=3", "train.zero_stage=1",
            "evals.digits.max_samples=40", "evals.digits_label={task: zeroshot, dataset: digits, "
            "max_samples: 40, options: {prefix: label}}"]
    torchrun(2, *args, "train.stop_after_steps=3", timeout=300)
    at3 = load_state(run_dir / "checkpoints" / "step_00000003")[1]["text.prefix_embedding"]
    proc = torchrun(2, *args, "--resume", "latest", timeout=300)
    assert "resumed from" in proc.stdout + proc.stderr
    final = load_file(str(run_dir / "model.safetensors"))["text.prefix_embedding"]
    init = nano(["caption", "label", "unused"]).text.prefix_embedding.detach()
    assert (final[:2] - at3[:2]).abs().amax() > 0 and (at3[:2] - init[:2]).abs().amax() > 0
    torch.testing.assert_close(final[2], init[2], rtol=0, atol=0)  # no sample, no gradient, no decay
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 6
    assert any("eval/digits_label/top1" in r for r in rows) and any("eval/digits/top1" in r for r in rows)
