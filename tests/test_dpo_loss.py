"""DPO loss (engine/recipes/dpo_loss.py) against closed forms computed independently in float64,
its gradients against autograd of the closed form and finite differences, the global-pair
normalisation, and the cp reduction of sequence log-prob sums (a 2-rank gloo world: sums and
gradients summed over ranks equal the single-process ones, I-5)."""
from __future__ import annotations

import math

import pytest
import torch

from engine.loss import IGNORE_INDEX
from engine.recipes.dpo_loss import dpo_loss, sequence_logprob_sums
from tests.harness import run_world

TOL = 1e-6
BETA = 0.1


def _pairs(num_pairs=6, seed=0, dtype=torch.float64):
    """Policy/reference sequence log-prob sums [P] (realistic magnitudes) and chosen counts."""
    g = torch.Generator().manual_seed(seed)
    ref_c = -torch.rand(num_pairs, generator=g, dtype=dtype) * 80 - 20
    ref_r = -torch.rand(num_pairs, generator=g, dtype=dtype) * 80 - 20
    pol_c = ref_c + torch.randn(num_pairs, generator=g, dtype=dtype) * 5
    pol_r = ref_r + torch.randn(num_pairs, generator=g, dtype=dtype) * 5
    counts = torch.randint(1, 60, (num_pairs,), generator=g)
    return pol_c, pol_r, ref_c, ref_r, counts


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _closed_form(pol_c, pol_r, ref_c, ref_r, counts, beta, loss_type, eps=0.0, sft=0.0) -> float:
    """Mean pair loss in Python floats (float64), one pair at a time."""
    total = 0.0
    for pc, pr, rc, rr, n in zip(pol_c.tolist(), pol_r.tolist(), ref_c.tolist(), ref_r.tolist(),
                                 counts.tolist()):
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            loss = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
        elif loss_type == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        else:
            loss = max(0.0, 1 - beta * h)
        total += loss + sft * (-pc / n)
    return total / len(counts)


def _closed_form_torch(pol_c, pol_r, ref_c, ref_r, counts, beta, loss_type, eps=0.0, sft=0.0):
    """The same closed form as torch ops written differently (for autograd reference gradients)."""
    h = (pol_c - ref_c) - (pol_r - ref_r)
    sig = lambda x: 1 / (1 + torch.exp(-x))
    if loss_type == "sigmoid":
        loss = -(1 - eps) * torch.log(sig(beta * h)) - eps * torch.log(sig(-beta * h))
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = torch.clamp(1 - beta * h, min=0)
    return (loss - sft * pol_c / counts).mean()


CASES = [("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.5), ("ipo", 0.0, 0.0),
         ("ipo", 0.0, 1.0), ("hinge", 0.0, 0.0), ("hinge", 0.0, 0.2)]


@pytest.mark.parametrize("loss_type,eps,sft", CASES)
def test_loss_matches_closed_form(loss_type, eps, sft):
    pol_c, pol_r, ref_c, ref_r, counts = _pairs()
    for beta in (BETA, 0.5):
        loss, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=eps,
                           sft_weight=sft, chosen_token_counts=counts, num_pairs_global=len(counts))
        want = _closed_form(pol_c, pol_r, ref_c, ref_r, counts, beta, loss_type, eps, sft)
        assert loss.item() == pytest.approx(want, rel=TOL, abs=TOL)


def test_float32_inputs_match_float64_closed_form():
    pol_c, pol_r, ref_c, ref_r, counts = _pairs()
    args32 = [t.float() for t in (pol_c, pol_r, ref_c, ref_r)]
    loss, _ = dpo_loss(*args32, beta=BETA, num_pairs_global=len(counts))
    assert loss.dtype == torch.float32
    want = _closed_form(*args32, counts, BETA, "sigmoid")
    assert loss.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("loss_type,eps,sft", CASES)
def test_gradients_match_autograd_of_closed_form(loss_type, eps, sft):
    pol_c, pol_r, ref_c, ref_r, counts = _pairs(seed=1)
    grads = []
    for fn in (lambda *a: dpo_loss(*a, beta=BETA, loss_type=loss_type, label_smoothing=eps, sft_weight=sft,
                                   chosen_token_counts=counts, num_pairs_global=len(counts))[0],
               lambda *a: _closed_form_torch(*a, counts, BETA, loss_type, eps, sft)):
        pc, pr = pol_c.clone().requires_grad_(), pol_r.clone().requires_grad_()
        rc, rr = ref_c.clone().requires_grad_(), ref_r.clone().requires_grad_()
        fn(pc, pr, rc, rr).backward()
        grads.append((pc.grad, pr.grad, rc.grad))
    (gc, gr, g_ref), (wc, wr, _) = grads
    torch.testing.assert_close(gc, wc, rtol=TOL, atol=1e-12)
    torch.testing.assert_close(gr, wr, rtol=TOL, atol=1e-12)
    assert g_ref is None  # the reference model is frozen: no gradient flows to its log-probs


@pytest.mark.parametrize("loss_type,eps,sft", CASES)
def test_gradients_match_finite_differences(loss_type, eps, sft):
    pol_c, pol_r, ref_c, ref_r, counts = _pairs(seed=2)
    if loss_type == "hinge":  # keep every pair away from the kink at β·h = 1
        h = (pol_c - ref_c) - (pol_r - ref_r)
        assert ((1 - BETA * h).abs() > 1e-3).all()

    def f(pc, pr):
        return dpo_loss(pc, pr, ref_c, ref_r, beta=BETA, loss_type=loss_type, label_smoothing=eps,
                        sft_weight=sft, chosen_token_counts=counts, num_pairs_global=len(counts))[0]

    assert torch.autograd.gradcheck(f, (pol_c.clone().requires_grad_(), pol_r.clone().requires_grad_()),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


def test_policy_equal_to_reference():
    _, _, ref_c, ref_r, counts = _pairs()
    same = {"num_pairs_global": len(counts)}
    sigmoid, m = dpo_loss(ref_c.clone(), ref_r.clone(), ref_c, ref_r, beta=BETA, **same)
    assert abs(sigmoid.item() - math.log(2)) < 1e-15
    ipo, _ = dpo_loss(ref_c.clone(), ref_r.clone(), ref_c, ref_r, beta=BETA, loss_type="ipo", **same)
    assert ipo.item() == pytest.approx((1 / (2 * BETA)) ** 2, rel=1e-15)
    hinge, _ = dpo_loss(ref_c.clone(), ref_r.clone(), ref_c, ref_r, beta=BETA, loss_type="hinge", **same)
    assert hinge.item() == 1.0
    assert m["rewards/chosen"].item() == 0 and m["rewards/margin"].item() == 0
    assert m["rewards/accuracy"].item() == 0  # a tie is not a win


def test_label_smoothing_symmetry():
    pol_c, pol_r, ref_c, ref_r, counts = _pairs(seed=3)
    kw = {"beta": BETA, "num_pairs_global": len(counts)}
    plain, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, **kw)
    swapped, _ = dpo_loss(pol_r, pol_c, ref_r, ref_c, **kw)  # h → −h
    for eps in (0.1, 0.25, 0.5):
        smooth, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, label_smoothing=eps, **kw)
        torch.testing.assert_close(smooth, (1 - eps) * plain + eps * swapped, rtol=1e-12, atol=0)
    # at ε = ½ the loss cannot tell chosen from rejected, and h = 0 is its minimum
    half = dict(label_smoothing=0.5, **kw)
    torch.testing.assert_close(dpo_loss(pol_c, pol_r, ref_c, ref_r, **half)[0],
                               dpo_loss(pol_r, pol_c, ref_r, ref_c, **half)[0], rtol=1e-12, atol=0)
    pc = ref_c.clone().requires_grad_()
    dpo_loss(pc, ref_r, ref_c, ref_r, **half)[0].backward()
    assert pc.grad.abs().max().item() < 1e-15


def test_sft_term():
    pol_c, pol_r, ref_c, ref_r, counts = _pairs(seed=4)
    kw = {"beta": BETA, "chosen_token_counts": counts, "num_pairs_global": len(counts)}
    for loss_type in ("sigmoid", "ipo", "hinge"):
        base, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, loss_type=loss_type, **kw)
        with_sft, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, loss_type=loss_type, sft_weight=0.7, **kw)
        want = 0.7 * sum(-pc / n for pc, n in zip(pol_c.tolist(), counts.tolist())) / len(counts)
        assert (with_sft - base).item() == pytest.approx(want, rel=1e-12)
    # an empty chosen response (π_c = 0, n_c = 0) adds 0, not NaN
    zero = torch.zeros(1, dtype=torch.float64)
    loss, _ = dpo_loss(zero, zero, zero, zero, beta=BETA, sft_weight=1.0,
                       chosen_token_counts=torch.zeros(1, dtype=torch.int64), num_pairs_global=1)
    assert loss.item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="chosen_token_counts"):
        dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=BETA, sft_weight=0.5, num_pairs_global=len(counts))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_global_pair_normalisation(loss_type):
    """Two "dp ranks" holding 2 and 5 of 7 pairs: losses and gradients sum to the full batch's."""
    pol_c, pol_r, ref_c, ref_r, counts = _pairs(num_pairs=7, seed=5)
    kw = {"beta": BETA, "loss_type": loss_type, "sft_weight": 0.3, "num_pairs_global": 7}
    pc = pol_c.clone().requires_grad_()
    full, full_m = dpo_loss(pc, pol_r, ref_c, ref_r, chosen_token_counts=counts, **kw)
    full.backward()
    parts, grads, metrics = [], [], []
    for sl in (slice(0, 2), slice(2, 7)):
        pc_r = pol_c[sl].clone().requires_grad_()
        loss, m = dpo_loss(pc_r, pol_r[sl], ref_c[sl], ref_r[sl], chosen_token_counts=counts[sl], **kw)
        loss.backward()
        parts.append(loss)
        grads.append(pc_r.grad)
        metrics.append(m)
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat(grads), pc.grad, rtol=1e-12, atol=0)
    for key in full_m:
        assert (metrics[0][key] + metrics[1][key]).item() == pytest.approx(full_m[key].item(), rel=1e-12)


def test_metrics_are_detached_sums():
    pol_c, pol_r, ref_c, ref_r, counts = _pairs(seed=6)
    _, m = dpo_loss(pol_c.requires_grad_(), pol_r, ref_c, ref_r, beta=BETA, num_pairs_global=100)
    r_c, r_r = BETA * (pol_c - ref_c), BETA * (pol_r - ref_r)
    assert not any(v.requires_grad for v in m.values())
    assert m["num_pairs"].item() == len(counts)
    assert m["rewards/chosen"].item() == pytest.approx(r_c.sum().item(), rel=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(r_r.sum().item(), rel=1e-12)
    assert m["rewards/margin"].item() == pytest.approx((r_c - r_r).sum().item(), rel=1e-12)
    assert m["rewards/accuracy"].item() == (r_c > r_r).sum().item()


def test_invalid_arguments():
    pol_c, pol_r, ref_c, ref_r, _ = _pairs()
    args = (pol_c, pol_r, ref_c, ref_r)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, beta=BETA, loss_type="simpo", num_pairs_global=6)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, beta=0.0, num_pairs_global=6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, beta=BETA, label_smoothing=0.7, num_pairs_global=6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, beta=BETA, loss_type="ipo", label_smoothing=0.1, num_pairs_global=6)
    with pytest.raises(ValueError, match="num_pairs_global"):
        dpo_loss(*args, beta=BETA, num_pairs_global=0)


# -- sequence log-prob sums --------------------------------------------------------------------
def _packed(seed=0, lengths=(7, 10, 5, 12, 3, 9)):
    """A packed micro-batch: segment ids (trailing padding = −1), labels with ignored prompt
    tokens, and per-token losses (0 where ignored, as vocab_parallel_cross_entropy gives)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((4,), -1)])
    labels = torch.randint(0, 100, seg.shape, generator=g)
    labels[torch.rand(seg.shape, generator=g) < 0.3] = IGNORE_INDEX
    labels[seg < 0] = IGNORE_INDEX
    losses = torch.rand(seg.shape, generator=g, dtype=torch.float64) * 5
    losses[labels == IGNORE_INDEX] = 0
    return seg, labels, losses, len(lengths)


def test_sequence_logprob_sums_match_loop():
    seg, labels, losses, num = _packed()
    leaf = losses.clone().requires_grad_()
    sums, counts = sequence_logprob_sums(leaf, seg, num, None, labels_T=labels)
    for i in range(num):
        mine = [t for t in range(len(seg)) if seg[t] == i]
        assert sums[i].item() == pytest.approx(-sum(losses[t].item() for t in mine), rel=1e-12)
        assert counts[i].item() == sum(int(labels[t] != IGNORE_INDEX) for t in mine)
    assert counts.dtype == torch.int64
    sums.sum().backward()  # each present token's log-prob enters its sequence once, with sign −1
    torch.testing.assert_close(leaf.grad, torch.where(seg >= 0, -1.0, 0.0).double())
    # without labels every token with a segment counts
    _, all_counts = sequence_logprob_sums(losses, seg, num, None)
    assert all_counts.tolist() == [int((seg == i).sum()) for i in range(num)]


# -- cp: a 2-rank gloo world, each rank holding half of every sequence ---------------------------
def _cp_case():
    """Token log-probs = x_t·θ (θ a stand-in for the model's parameters) of 2 pairs packed as
    sequences [c0, r0, c1, r1], with frozen reference sums; the same on every rank."""
    seg, labels, _, num = _packed(seed=7, lengths=(9, 6, 11, 8))
    g = torch.Generator().manual_seed(8)
    x = torch.randn(len(seg), 5, generator=g, dtype=torch.float64)
    theta = torch.randn(5, generator=g, dtype=torch.float64) * 0.3
    ref = -torch.rand(num, generator=g, dtype=torch.float64) * 10
    return seg, labels, x, theta, ref, num


def _rank_tokens(seg, rank, world):
    """Rank r's contiguous share of every sequence (as cp hands out slices of each document)."""
    idx = []
    for i in range(int(seg.max()) + 1):
        pos = (seg == i).nonzero().flatten()
        idx.append(pos.tensor_split(world)[rank])
    idx.append((seg < 0).nonzero().flatten().tensor_split(world)[rank])
    return torch.cat(idx)


def _loss_of(sums, counts, ref):
    loss, _ = dpo_loss(sums[0::2], sums[1::2], ref[0::2], ref[1::2], beta=0.5, sft_weight=0.2,
                       chosen_token_counts=counts[0::2], num_pairs_global=2)
    return loss


def _forward_backward(seg, labels, x, theta, ref, num, group):
    theta = theta.clone().requires_grad_()
    token_losses = torch.where(labels != IGNORE_INDEX, -(x @ theta), 0.0)
    token_losses.retain_grad()
    sums, counts = sequence_logprob_sums(token_losses, seg, num, group, labels_T=labels)
    loss = _loss_of(sums, counts, ref)
    loss.backward()
    return {"sums": sums.detach(), "counts": counts, "loss": loss.detach(),
            "token_grad": token_losses.grad, "theta_grad": theta.grad}


def _cp_world(rank, world):
    import torch.distributed as dist

    seg, labels, x, theta, ref, num = _cp_case()
    idx = _rank_tokens(seg, rank, world)
    out = _forward_backward(seg[idx], labels[idx], x[idx], theta, ref, num, dist.group.WORLD)
    out["idx"] = idx
    return out


def test_cp_reduction_matches_single_process():
    seg, labels, x, theta, ref, num = _cp_case()
    want = _forward_backward(seg, labels, x, theta, ref, num, None)
    ranks = run_world(2, _cp_world)
    token_grad = torch.zeros_like(want["token_grad"])
    for r in ranks:
        # every rank sees the full sums and counts, and the same loss
        torch.testing.assert_close(r["sums"], want["sums"], rtol=1e-12, atol=1e-12)
        assert r["counts"].tolist() == want["counts"].tolist()
        torch.testing.assert_close(r["loss"], want["loss"], rtol=1e-12, atol=0)
        token_grad[r["idx"]] += r["token_grad"]
    assert sorted(torch.cat([r["idx"] for r in ranks]).tolist()) == list(range(len(seg)))
    # each token's gradient comes from the rank holding it; parameter gradients summed over cp
    # equal the single-process gradient (identity backward: not cp× too large, not 1/cp too small)
    torch.testing.assert_close(token_grad, want["token_grad"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ranks[0]["theta_grad"] + ranks[1]["theta_grad"], want["theta_grad"],
                               rtol=1e-10, atol=1e-15)
