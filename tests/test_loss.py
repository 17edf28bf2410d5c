"""ClipLoss: value against open_clip's, and exact multi-process gradients with real processes."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT, torchrun
from tests.workers.loss_grad import loss_and_grads, make_problem
from vlp.losses import ClipLoss, SigLipLoss


def test_single_process_matches_open_clip_and_hand_computation():
    from open_clip.loss import ClipLoss as OpenClipLoss

    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(14.0)
    ours = ClipLoss()(img, txt, scale)
    ref = OpenClipLoss()(img, txt, scale)
    logits = scale * img @ txt.t()
    by_hand = -(logits.diag() - logits.logsumexp(1)).mean() / 2 - (logits.diag() - logits.logsumexp(0)).mean() / 2
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, by_hand, rtol=1e-6, atol=1e-6)


def test_sigmoid_loss_matches_open_clip_and_hand_computation():
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = SigLipLoss()(img, txt, scale, bias)
    ref = OpenSigLipLoss()(img, txt, scale, bias)
    logits = scale * img @ txt.t() + bias
    signs = 2 * torch.eye(6) - 1
    by_hand = -torch.log(torch.sigmoid(signs * logits)).sum() / 6
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, txt, scale)


def test_soft_clip_loss_is_clip_at_alpha_zero_and_matches_hand_computation():
    from vlp.losses import SoftClipLoss

    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(9.0, dtype=torch.float64)
    torch.testing.assert_close(SoftClipLoss(alpha=0.0)(img, txt, scale), ClipLoss()(img, txt, scale))
    a = 0.3
    eye = torch.eye(6, dtype=torch.float64)

    def ce(logits, target):  # cross-entropy against a probability target, averaged over rows
        return -(target * logits.log_softmax(1)).sum(1).mean()

    q_img = (1 - a) * eye + a * (scale * img @ img.t()).softmax(1)
    q_txt = (1 - a) * eye + a * (scale * txt @ txt.t()).softmax(1)
    by_hand = (ce(scale * img @ txt.t(), q_img) + ce(scale * txt @ img.t(), q_txt)) / 2
    torch.testing.assert_close(SoftClipLoss(alpha=a)(img, txt, scale), by_hand.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        SoftClipLoss(alpha=1.0)


def test_small_loss_drops_the_largest_loss_pairs_as_anchors_and_ramps():
    from vlp.losses import SmallLossClipLoss

    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(7.0, dtype=torch.float64)
    torch.testing.assert_close(SmallLossClipLoss(drop=0.0)(img, txt, scale), ClipLoss()(img, txt, scale))
    # by hand: every pair's symmetric term over the full matrices, the 3 largest (floor(0.4 * 8)) left out
    logits = scale * img @ txt.t()
    terms = -(logits.diag() - logits.logsumexp(1)) / 2 - (logits.diag() - logits.logsumexp(0)) / 2
    kept = terms.argsort()[:5]
    loss = SmallLossClipLoss(drop=0.4)
    torch.testing.assert_close(loss(img, txt, scale), terms[kept].mean().float(), rtol=1e-5, atol=1e-6)
    assert loss.last_cut == pytest.approx(float(terms.sort().values[5]), rel=1e-5)
    ramped = SmallLossClipLoss(drop=0.4, ramp_steps=4)
    shares = []
    for step in range(6):
        ramped.steps_done.fill_(step)
        shares.append(ramped.drop_share())
    assert shares == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    with pytest.raises(ValueError, match="drop"):
        SmallLossClipLoss(drop=1.0)


TWO_PROCESS_LOSSES = ["clip", "clip_tiled", "siglip", "siglip_tiled", "soft_clip", "small_loss"]
TWO_PROCESS_SIZES = ["4,4", "5,3"]


@pytest.fixture(scope="module")
def two_process_grads(tmp_path_factory):
    """Every loss and split of the batch over 2 real processes, in one torchrun launch."""
    out = tmp_path_factory.mktemp("grads")
    cases = [f"{loss}:{sizes}" for loss in TWO_PROCESS_LOSSES for sizes in TWO_PROCESS_SIZES]
    torchrun(2, str(ROOT / "tests/workers/loss_grad.py"), str(out), *cases, timeout=300)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loss", TWO_PROCESS_LOSSES)
@pytest.mark.parametrize("sizes", TWO_PROCESS_SIZES)
def test_two_process_gradients_equal_full_batch(two_process_grads, sizes, loss):
    got = torch.load(two_process_grads / f"{loss}-{sizes}.pt", weights_only=True)
    # reference: the plain (untiled) loss on the full batch in one process
    plain = loss.removesuffix("_tiled")
    ref = dict(zip(["loss", "g_img", "g_txt", "g_s", "g_b"], loss_and_grads(*make_problem(), plain)))
    names = ["loss", "g_img", "g_txt", "g_s"] + (["g_b"] if plain == "siglip" else [])
    for name in names:
        a, b = got[name], ref[name]
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 1e-5, f"{loss} {name}: relative error {rel:.2e} with sizes {sizes}"


@pytest.mark.parametrize("form", ["per_row", "summed"])
@pytest.mark.parametrize("tile", [1, 4, 7, 64])
def test_tiled_logsumexp_forms_equal_dense_in_value_and_gradients(tile, form):
    """per_row: tiled_logsumexp (column tiles, recomputing backward) under per-row weights;
    summed: blocked_logsumexp_sum (row blocks, gradients from the forward), what ClipLoss uses."""
    from vlp.losses import blocked_logsumexp_sum, tiled_logsumexp

    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, generator=g, dtype=torch.float64)
    lse = (s * x @ y.t()).logsumexp(dim=1)
    if form == "per_row":
        dense, ours = (lse * w).sum(), (tiled_logsumexp(x, y, s, tile) * w).sum()
    else:
        dense, ours = lse.sum() * 0.3, blocked_logsumexp_sum(x, y, s, tile) * 0.3
        with torch.no_grad():  # no gradients asked: value only
            torch.testing.assert_close(blocked_logsumexp_sum(x, y, s, tile), lse.sum().detach())
    grads_dense = torch.autograd.grad(dense, (x, y, s))
    grads_ours = torch.autograd.grad(ours, (x, y, s))
    torch.testing.assert_close(ours, dense, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_ours, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_tiled_clip_loss_equals_plain_single_process():
    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0, requires_grad=True)
    img.requires_grad_(True), txt.requires_grad_(True)
    plain = ClipLoss()(img, txt, scale)
    g_plain = torch.autograd.grad(plain, (img, txt, scale))
    tiled = ClipLoss(tile_size=4)(img, txt, scale)
    g_tiled = torch.autograd.grad(tiled, (img, txt, scale))
    torch.testing.assert_close(tiled, plain)
    for a, b in zip(g_tiled, g_plain):
        assert ((a - b).norm() / b.norm()).item() <= 1e-5


@pytest.mark.parametrize("tile", [1, 3, 4, 64])
@pytest.mark.parametrize("matching", [True, False])
def test_tiled_sigmoid_equals_dense_in_value_and_gradients(tile, matching):
    from vlp.losses import tiled_sigmoid_loss

    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10 if matching else 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    z = (2 * torch.eye(10, dtype=torch.float64) - 1) if matching else -torch.ones(10, 7, dtype=torch.float64)
    dense = -torch.log(torch.sigmoid(z * (s * x @ y.t() + b))).sum()  # by hand, no shared code
    grads_dense = torch.autograd.grad(dense * 1.7, (x, y, s, b))
    tiled = tiled_sigmoid_loss(x, y, s, b, tile, matching)
    grads_tiled = torch.autograd.grad(tiled * 1.7, (x, y, s, b))
    torch.testing.assert_close(tiled, dense, rtol=1e-12, atol=1e-12)
    for a, ref in zip(grads_tiled, grads_dense):
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)


def test_tiled_sigmoid_loss_equals_plain_single_process():
    g = torch.Generator().manual_seed(6)
    img = F.normalize(torch.randn(10, 8, generator=g), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(10, 8, generator=g), dim=-1).requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    inputs = (img, txt, scale, bias)
    plain = SigLipLoss()(*inputs)
    g_plain = torch.autograd.grad(plain, inputs)
    tiled = SigLipLoss(tile_size=3)(*inputs)
    g_tiled = torch.autograd.grad(tiled, inputs)
    torch.testing.assert_close(tiled, plain, rtol=1e-6, atol=0)
    for a, b in zip(g_tiled, g_plain):
        assert ((a - b).norm() / b.norm()).item() <= 1e-5
    with pytest.raises(ValueError, match="tile_size"):
        SigLipLoss(tile_size=-1)
