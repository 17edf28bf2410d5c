"""ClipLoss: value against open_clip's, and exact multi-process gradients with real processes."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT, torchrun
from tests.workers.loss_grad import loss_and_grads, make_problem
from vlp.losses import ClipLoss


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


@pytest.mark.slow
@pytest.mark.parametrize("sizes", ["4,4", "5,3"])
def test_two_process_gradients_equal_full_batch(tmp_path, sizes):
    out = tmp_path / "grads.pt"
    torchrun(2, str(ROOT / "tests/workers/loss_grad.py"), str(out), sizes, timeout=180)
    got = torch.load(out, weights_only=True)
    ref_loss, ref_img, ref_txt, ref_s = loss_and_grads(*make_problem())
    for name, a, b in [("loss", got["loss"], ref_loss), ("grad image", got["g_img"], ref_img),
                       ("grad text", got["g_txt"], ref_txt), ("grad scale", got["g_s"], ref_s)]:
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e} with sizes {sizes}"

