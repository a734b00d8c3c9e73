import json
import math

import pytest
import torch
import torch.nn.functional as F
from numerics import UBF16, gamma, softmax_error_bound

from dist_seg.config.schema import LossConfig
from dist_seg.data.class_weights import median_frequency_weights
from dist_seg.train.losses import CELoss, FocalLoss, build_loss, load_class_weights, soft_dice_loss

IGN = 255


def _data(n=2, c=4, h=5, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[0, :2] = IGN
    return logits, target


def test_median_frequency_by_hand():
    # freq = 10/100, 30/60, unseen, 5/50 = 0.1, 0.5, -, 0.1 -> median of seen = 0.1
    assert median_frequency_weights([10, 30, 0, 5], [100, 60, 0, 50]) == pytest.approx([1.0, 0.2, 0.0, 1.0])
    # freq 0.1 .. 0.4: even count, median 0.25
    assert median_frequency_weights([1, 2, 3, 4], [10] * 4) == pytest.approx([2.5, 1.25, 0.25 / 0.3, 0.625])


def test_median_frequency_rejects_bad_counts():
    with pytest.raises(ValueError, match="2 pixel counts but 3"):
        median_frequency_weights([1, 2], [3, 4, 5])
    with pytest.raises(ValueError, match="class 1 has 9 pixels"):
        median_frequency_weights([1, 9], [5, 5])
    with pytest.raises(ValueError, match="no class"):
        median_frequency_weights([0, 0], [0, 0])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_ce_equals_torch(weighted, smoothing):
    logits, target = _data()
    weights = torch.tensor([0.5, 1.0, 2.0, 0.25]) if weighted else None
    loss = build_loss(LossConfig(name="ce", label_smoothing=smoothing), 4, weights)(logits, target)
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=IGN, label_smoothing=smoothing)
    assert loss.dtype == torch.float32
    # Both are (a S1 + b S2) / W, a = 1 - smoothing, b = smoothing / C: S1, S2 sums of n = target.numel() (at
    # most) non-negative per-pixel terms that come from the same kernels in both (F.cross_entropy is
    # log_softmax + nll_loss; the loss calls it with reduction="sum"), W the sum of the labelled pixels'
    # weights. Each side sums them in its own order (gamma(n) each, non-negative terms) and combines them
    # with <= 5 roundings, so each is within gamma(2n + 5) of the exact value and they are within
    # 2 gamma(2n + 6) of each other, relative. (The old rel=1e-6 was below that worst case, 1.5e-5, and held
    # because weights that are multiples of 1/4 make W exact.) Measured: equal. A wrong denominator (all
    # pixels, unweighted) is off by > 10%.
    n = target.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=2 * gamma(2 * n + 6))


@pytest.mark.parametrize("name", ["ce", "ce+dice", "focal"])
def test_all_ignored_gives_zero_with_gradient(name):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGN, dtype=torch.int64)
    loss = build_loss(LossConfig(name=name, label_smoothing=0.1), 3, torch.tensor([1.0, 2.0, 3.0]))(
        logits, target
    )
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ["ce", "ce+dice", "focal"])
def test_low_precision_logits_compute_in_float32(name):
    logits, target = _data()
    loss_fn = build_loss(LossConfig(name=name), 4)
    ref = loss_fn(logits, target)
    big = (logits * 2000).to(torch.bfloat16).requires_grad_()  # far beyond fp16's range when exponentiated
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(big, target)
        low = loss_fn(logits.to(torch.bfloat16), target)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out) and torch.isfinite(big.grad).all()
    # `low` is the float32 loss of logits rounded to bf16: each logit moves by at most
    # delta = UBF16 * max|logit|. The loss is Lipschitz in the sup norm of the logits with constant L, by the
    # mean value theorem on bounds of its gradient that hold everywhere: CE, a (weighted) mean of
    # -log softmax_t, has per-pixel gradient p - onehot, of L1 norm <= 2; focal, -(1-p)^g log p with
    # |d/d(log p)| <= 1 + g p |log p| (1-p)^(g-1) <= 1 + g/e and |d log p| <= 2 delta, gives 2 + 2g/e; soft
    # dice moves each class's intersection I and total K by at most 2 delta K and its ratio (2I+1)/(K+1) <= 1
    # by at most 6 delta; CE + w dice: 2 + 6w. Both sides also round in float32 (gamma(n + C + 8), relative,
    # per side). Measured here: 0.1-0.4% of the bound (it is a worst case over every logit moving at once).
    lipschitz = {"ce": 2.0, "focal": 2.0 + 2.0 * 2.0 / math.e, "ce+dice": 2.0 + 6.0 * 1.0}[name]
    delta = UBF16 * float(logits.abs().max())
    bound = lipschitz * delta + 2 * gamma(target.numel() + 4 + 8) * abs(ref.item())
    assert abs(low.item() - ref.item()) <= bound, (abs(low.item() - ref.item()), bound)


def test_dice_perfect_prediction_is_near_zero():
    _, target = _data(c=3)
    valid = target != IGN
    onehot = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    logits = onehot * 30.0
    perfect = soft_dice_loss(logits, target, valid)
    wrong = soft_dice_loss(onehot.roll(1, dims=1) * 30.0, target, valid)
    # the float64 value of the same loss (each class's (2 I + 1) / (K + 1) over the labelled pixels), and the
    # float32 computation within the bound test_dice_matches_float64_reference derives for it
    p = logits.double().softmax(1)
    scores = []
    for k in range(3):
        pk, gk = p[:, k][valid], (target[valid] == k).double()
        scores.append((2 * (pk * gk).sum() + 1.0) / (pk.sum() + gk.sum() + 1.0))
    exact = float(1 - torch.stack(scores).mean())
    p64, pb = softmax_error_bound(logits.double(), torch.zeros_like(logits, dtype=torch.float64))
    rho = float((pb / p64).max())
    bound = (2 * rho + gamma(2 * target.numel() + 3 + 6)) * 1.001
    assert exact < 1e-10  # a perfect prediction: the loss is exp(-30)-small
    assert abs(perfect.item() - exact) <= bound, (perfect.item(), exact, bound)
    assert wrong.item() > 0.9


def test_ce_dice_adds_weighted_dice():
    logits, target = _data()
    ce = build_loss(LossConfig(name="ce"), 4)(logits, target)
    both = build_loss(LossConfig(name="ce+dice", dice_weight=0.5), 4)(logits, target)
    dice = soft_dice_loss(logits, target, target != IGN)
    # ce+dice computes the same ce and dice (the same ops on the same tensors), an exact halving and one
    # float32 addition: within u of the exact sum, which the float64 sum here gives to within 2^-53 -- gamma(1)
    assert both.item() == pytest.approx(ce.item() + 0.5 * dice.item(), rel=gamma(1))


@pytest.mark.parametrize("weighted", [False, True])
def test_focal_gamma_zero_equals_ce(weighted):
    logits, target = _data()
    weights = torch.tensor([0.5, 1.0, 2.0, 0.25]) if weighted else None
    focal = FocalLoss(4, class_weights=weights, gamma=0.0)(logits, target)
    ce = CELoss(4, class_weights=weights)(logits, target)
    # the same per-pixel terms w_i (-log p_i) (the same log_softmax kernel on the same logits, one product
    # each) and the same denominator (the same code), summed in different orders: each sum of n non-negative
    # terms within gamma(n) of the exact one, one division each: within 2 gamma(n + 1) of each other. (The
    # old rel=1e-6 was below that worst case, 7e-6.)
    assert focal.item() == pytest.approx(ce.item(), rel=2 * gamma(target.numel() + 1))


def test_focal_by_hand():
    # logits [0, ln 3] -> p = [1/4, 3/4]; pixel 1 targets class 1, pixel 2 targets class 0.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    expected = (-(0.25**2) * math.log(0.75) - (0.75**2) * math.log(0.25)) / 2
    assert FocalLoss(2, gamma=2.0)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_build_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="loss.name"):
        build_loss(LossConfig(name="hinge"), 3)
    with pytest.raises(ValueError, match="shape"):
        build_loss(LossConfig(), 3, torch.ones(4))
    with pytest.raises(ValueError, match="focal_gamma"):
        build_loss(LossConfig(name="focal", focal_gamma=-1.0), 3)


def test_load_class_weights(tmp_path):
    assert load_class_weights(None, None, 3) is None
    class_stats = [
        {"index": 1, "name": "a", "pixels": 30, "images": 2, "image_pixels": 60},
        {"index": 0, "name": "bg", "pixels": 10, "images": 3, "image_pixels": 100},
        {"index": 2, "name": "b", "pixels": 5, "images": 1, "image_pixels": 50},
    ]
    # freq 0.1, 0.5, 0.1 -> median 0.1
    assert load_class_weights("auto", class_stats, 3).tolist() == pytest.approx([1.0, 0.2, 1.0])
    with pytest.raises(ValueError, match="manifest"):
        load_class_weights("auto", None, 3)

    plain = tmp_path / "w.json"
    plain.write_text(json.dumps([1, 2.5, 0.5]))
    assert load_class_weights(str(plain), None, 3).tolist() == [1.0, 2.5, 0.5]
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"num_images": 4, "suggested_class_weights": [0.5, 2.0]}))
    assert load_class_weights(str(summary), None, 2).tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match=r"summary\.json has 2 weights, expected 3"):
        load_class_weights(str(summary), None, 3)
    with pytest.raises(ValueError, match="not found.*nope.json"):
        load_class_weights(str(tmp_path / "nope.json"), None, 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"weights": [1]}))
    with pytest.raises(ValueError, match="bad.json"):
        load_class_weights(str(bad), None, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dice_equals_a_per_class_float64_reference_in_value_and_gradient(dtype):
    """soft_dice_loss against the formula written class by class in float64, with ignored pixels, at the
    precision training runs (the loss itself computes in float32 from bf16 logits)."""
    torch.manual_seed(1)
    c = 5
    logits = (torch.randn(3, c, 9, 7, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, c, (3, 9, 7))
    target[0, :3] = IGN
    target[target == 3] = 0  # one class absent from the truth: its score comes from the smoothing term
    valid = target != IGN

    def reference(x: torch.Tensor) -> torch.Tensor:
        p = x.double().softmax(1)
        scores = []
        for k in range(c):
            pk, gk = p[:, k][valid], (target[valid] == k).double()
            scores.append((2 * (pk * gk).sum() + 1.0) / (pk.sum() + gk.sum() + 1.0))
        return 1 - torch.stack(scores).mean()

    x = logits.detach().clone().requires_grad_()
    got = soft_dice_loss(x, target, valid)
    got.backward()
    xr = logits.detach().double().requires_grad_()
    ref = reference(xr)
    ref.backward()
    # The loss runs in float32 from inputs that are exact in float32 and float64 (bf16 too), so one bound
    # serves both dtypes. Each float32 probability is within rho (relative) of the exact one
    # (numerics.softmax_error_bound); each class's dice ratio (2 I + 1) / (K + 1) sums N = logits' pixels
    # (masked ones are zeros) non-negative terms in I and in K (gamma(N) each, plus rho) and adds 1 or the
    # label count (2 roundings), one division: within 2 rho + gamma(2N + 4), relative, of a ratio <= 1. The
    # C-term mean (gamma(C)) and 1 - mean (u) make it 2 rho + gamma(2N + C + 6), absolute (first order; the
    # factor 1.001 covers rho times gamma). The old 1e-6 (fp32) and 1e-5 (bf16) were below that worst case
    # (3.0e-5 here). Measured: 1e-8. A dice mixing classes, or counting ignored pixels, is off by > 1e-2.
    p64, pb = softmax_error_bound(logits.double(), torch.zeros_like(logits, dtype=torch.float64))
    rho = float((pb / p64).max())
    n_px = target.numel()
    bound = (2 * rho + gamma(2 * n_px + c + 6)) * 1.001
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) <= bound, (abs(got.item() - ref.item()), bound)
    # a bf16 leaf gets a bf16 gradient: rounded to 8 bits of mantissa
    rtol, atol = (1e-4, 1e-7) if dtype == torch.float32 else (1e-2, 1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=rtol, atol=atol)


def test_aux_loss_is_the_same_loss_on_both_heads_weighted():
    """model.aux_loss: loss(logits) + w * loss(aux), with the configured loss and class weights on both, by hand
    from the unwrapped loss (the sum of two float32 scalars: the same operations, so equal to the last bit)."""
    from dist_seg.models import TrainOutput

    logits, target = _data(seed=3)
    aux, _ = _data(seed=4)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5])
    cfg = LossConfig(name="ce+dice")
    plain = build_loss(cfg, 4, weights)
    with_aux = build_loss(cfg, 4, weights, aux_weight=0.4)
    got = with_aux(TrainOutput(logits, aux), target)
    assert torch.equal(got, plain(logits, target) + 0.4 * plain(aux, target))
    # a model without the head (a plain logits tensor) is refused, naming the key
    with pytest.raises(TypeError, match=r"model.aux_loss=0.4: .* returned Tensor"):
        with_aux(logits, target)
    assert build_loss(cfg, 4, weights, aux_weight=0.0).__class__ is plain.__class__
