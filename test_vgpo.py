"""
The tests of this project, read as its specification: each test names the property it
proves. Run them with `python -m pytest -q test_vgpo.py`.

The naive references below are written from ../shared/VGPO.md token by token, with
Python floats (float64) and plain loops, as far from the vectorised code as possible;
bench.py times the vectorised functions against these same loops.
"""

import collections
import itertools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import vgpo


# -----------------------------------------------------------------------------
# naive references, one loop per step of the spec

def naive_vgpo_advantages(rewards, group_ids, focus, response_mask, has_image=None, *,
                          intra=True, inter=True, compensation=True, gate=True,
                          beta=0.3, kappa=0.2, gamma=0.5, schedule="linear", start=0.0,
                          exponent=2.0, step_at=0.5, python_floats=True):
    """Steps 0-6 of VGPO.md, one token at a time. Returns (A as nested lists, alpha, psi).

    python_floats=False runs the very same loop on torch scalars (rewards[i],
    focus[i][t]), the way a first PyTorch draft reads; bench.py times both.
    """
    R, S = rewards.double(), focus.double()
    if python_floats:
        R, S = R.tolist(), S.tolist()
    gid = group_ids.tolist()
    M = response_mask.tolist()
    N = len(R)
    H = [True] * N if has_image is None else has_image.tolist()
    L = [sum(row) for row in M]
    groups = {}
    for i, g in enumerate(gid):
        groups.setdefault(g, []).append(i)

    # Step 0: GRPO advantage, Bessel-corrected std, all-equal groups get 0
    A0 = [0.0] * N
    for rows in groups.values():
        rs = [R[i] for i in rows]
        mean = sum(rs) / len(rs)
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1))
        for i in rows:
            A0[i] = 0.0 if max(rs) == min(rs) else (R[i] - mean) / (std + 1e-6)

    # Step 1: w = min-max of s over all valid tokens of the group
    w = [[0.0] * len(M[i]) for i in range(N)]
    for rows in groups.values():
        vals = [S[i][t] for i in rows for t in range(L[i])]
        lo, hi = min(vals), max(vals)
        for i in rows:
            for t in range(L[i]):
                w[i][t] = (S[i][t] - lo) / (hi - lo + 1e-8)

    psi = [[1.0] * len(M[i]) for i in range(N)]
    w_hat = [[0.0] * len(M[i]) for i in range(N)]
    for i in range(N):
        T = L[i]
        # Step 2: compensation c along the response
        c = [0.0] * T
        for t in range(T):
            x = t / (T - 1) if T > 1 else 0.0
            if not compensation:
                c[t] = 0.0
            elif schedule == "linear":
                c[t] = beta * (x - start) / (1 - start + 1e-8) if x >= start else 0.0
            elif schedule == "exp":
                c[t] = beta * min(max((x - start) / (1 - start), 0.0), 1.0) ** exponent
            else:
                c[t] = beta if (x >= step_at and x >= start) else 0.0
        # Step 3: gate, top-k of the tail, ties included
        G = [1] * T
        if gate:
            tail_start = math.floor(gamma * T)
            tail = [w[i][t] for t in range(tail_start, T)]
            k = max(1, math.floor(kappa * len(tail)))
            tau = sorted(tail, reverse=True)[k - 1]
            G = [1 if (t >= tail_start and w[i][t] >= tau) else 0 for t in range(T)]
        w_tilde = [w[i][t] * (1 + G[t] * c[t]) for t in range(T)]
        # Step 4: ŵ = per-response min-max (of w̃, or of w when intra is off); ψ
        src = w_tilde if intra else w[i][:T]
        lo, hi = min(src), max(src)
        for t in range(T):
            w_hat[i][t] = (src[t] - lo) / (hi - lo + 1e-8)
        if intra and H[i]:
            mean = sum(w_hat[i][:T]) / T
            for t in range(T):
                psi[i][t] = min(max(1 + w_hat[i][t] - mean, 0.1), 2.0)

    # Step 5: α from the visual accumulation φ, min-max within the group
    alpha = [1.0] * N
    if inter:
        phi = [sum(w_hat[i][:L[i]]) for i in range(N)]
        for rows in groups.values():
            lo, hi = min(phi[i] for i in rows), max(phi[i] for i in rows)
            phi_hat = {i: (phi[i] - lo) / (hi - lo + 1e-8) for i in rows}
            mean = sum(phi_hat.values()) / len(rows)
            for i in rows:
                alpha[i] = min(max(1 + phi_hat[i] - mean, 0.9), 2.0) if H[i] else 1.0

    # Step 6: A = Â α ψ on valid tokens, 0 on padding
    A = [[float(A0[i] * alpha[i] * psi[i][t]) if t < L[i] else 0.0 for t in range(len(M[i]))]
         for i in range(N)]
    return A, [float(a) for a in alpha], [[float(p) for p in row] for row in psi]


def naive_visual_focus(response_hidden, prompt_hidden, image_mask):
    """Step 1 with torch's own cosine_similarity, one token at a time."""
    N, T, _ = response_hidden.shape
    s = torch.zeros(N, T)
    for i in range(N):
        v = prompt_hidden[i][image_mask[i]].float().mean(dim=0)
        for t in range(T):
            s[i, t] = F.cosine_similarity(response_hidden[i, t].float(), v, dim=0)
    return s


# -----------------------------------------------------------------------------
# a batch with every awkward case the spec names

def make_batch(seed=0, T=12):
    """16 responses in 5 prompts, rows of each prompt scattered across the batch.

    prompt 10: lengths 1, 2, 12, 7 (length-1 and length-2 responses), mixed rewards
    prompt 3 : rewards all equal -> GRPO advantage 0
    prompt 7 : one response whose focus is flat (the same s at every token)
    prompt 5 : no image -> neutral factors
    prompt 42: five responses, random everything
    """
    g = torch.Generator().manual_seed(seed)
    spec = [  # (prompt id, length, reward, flat focus, has image)
        (10, 1, 1.0, False, True), (10, 2, 0.0, False, True), (10, 12, 1.0, False, True),
        (10, 7, 0.0, False, True),
        (3, 5, 1.0, False, True), (3, 9, 1.0, False, True), (3, 11, 1.0, False, True),
        (7, 8, 0.0, True, True), (7, 10, 1.0, False, True), (7, 3, 1.0, False, True),
        (7, 12, 0.0, False, True),
        (5, 6, 1.0, False, False), (5, 4, 0.0, False, False),
    ] + [(42, int(torch.randint(1, T + 1, (1,), generator=g)),
          float(torch.randint(0, 2, (1,), generator=g)), False, True) for _ in range(3)]
    spec[-1] = (42, spec[-1][1], 1.0 - spec[-2][2], False, True)         # not all equal
    perm = torch.randperm(len(spec), generator=g).tolist()               # scatter groups
    spec = [spec[p] for p in perm]
    N = len(spec)
    group_ids = torch.tensor([s[0] for s in spec])
    rewards = torch.tensor([s[2] for s in spec])
    lengths = torch.tensor([s[1] for s in spec])
    response_mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    focus = torch.rand(N, T, generator=g) * 2 - 1
    for i, s in enumerate(spec):
        if s[3]:
            focus[i] = 0.25
    focus = torch.where(response_mask, focus, 1e3)                       # junk on padding
    has_image = torch.tensor([s[4] for s in spec])
    return rewards, group_ids, focus, response_mask, has_image


SWITCHES = list(itertools.product([True, False], repeat=4))


# -----------------------------------------------------------------------------
# 1. parity with the naive reference

@pytest.mark.parametrize("schedule", vgpo.SCHEDULES)
@pytest.mark.parametrize("intra,inter,compensation,gate", SWITCHES)
def test_vgpo_advantages_match_the_naive_loop(intra, inter, compensation, gate, schedule):
    rewards, group_ids, focus, mask, has_image = make_batch(seed=len(schedule))
    kw = dict(intra=intra, inter=inter, compensation=compensation, gate=gate,
              schedule=schedule, start=0.1 if schedule == "exp" else 0.0)
    adv, stats = vgpo.vgpo_advantages(rewards, group_ids, focus, mask, has_image, **kw)
    ref, alpha, psi = naive_vgpo_advantages(rewards, group_ids, focus, mask, has_image, **kw)
    torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["alpha"], torch.tensor(alpha, dtype=torch.float32))
    torch.testing.assert_close(stats["psi"], torch.tensor(psi, dtype=torch.float32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_vgpo_advantages_match_the_naive_loop_on_random_groups(seed):
    g = torch.Generator().manual_seed(100 + seed)
    N, T = 24, 40
    group_ids = torch.randint(0, 4, (N,), generator=g) * 13             # ~6 rows a prompt
    group_ids[:8] = torch.arange(4).repeat(2) * 13                       # every group >= 2
    rewards = torch.rand(N, generator=g)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    focus = torch.randn(N, T, generator=g)
    kw = dict(beta=0.5, kappa=0.3, gamma=0.4)
    adv, _ = vgpo.vgpo_advantages(rewards, group_ids, focus, mask, **kw)
    ref, _, _ = naive_vgpo_advantages(rewards, group_ids, focus, mask, **kw)
    torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_the_awkward_cases_get_the_spec_values():
    rewards, group_ids, focus, mask, has_image = make_batch()
    adv, stats = vgpo.vgpo_advantages(rewards, group_ids, focus, mask, has_image)
    lengths = mask.sum(1)
    equal_group = group_ids == 3
    assert (adv[equal_group] == 0).all(), "all-equal rewards must give A = 0"
    no_image = group_ids == 5
    assert (stats["psi"][no_image] == 1).all() and (stats["alpha"][no_image] == 1).all()
    assert (adv[no_image][mask[no_image]] != 0).all(), "no-image prompts are plain GRPO"
    one = lengths == 1
    assert (stats["psi"][one] == 1).all(), "a length-1 response has nothing to re-weight"
    assert (adv[~mask] == 0).all(), "padding carries no advantage"


# -----------------------------------------------------------------------------
# 2. invariances

def test_shuffling_rows_does_not_change_any_rows_result():
    rewards, group_ids, focus, mask, has_image = make_batch(seed=3)
    adv, stats = vgpo.vgpo_advantages(rewards, group_ids, focus, mask, has_image)
    perm = torch.randperm(rewards.numel(), generator=torch.Generator().manual_seed(9))
    adv_p, stats_p = vgpo.vgpo_advantages(rewards[perm], group_ids[perm], focus[perm],
                                          mask[perm], has_image[perm])
    torch.testing.assert_close(adv_p, adv[perm])
    torch.testing.assert_close(stats_p["alpha"], stats["alpha"][perm])


def test_a_groups_result_does_not_depend_on_the_other_groups_in_the_batch():
    rewards, group_ids, focus, mask, has_image = make_batch(seed=4)
    adv, _ = vgpo.vgpo_advantages(rewards, group_ids, focus, mask, has_image)
    for gid in group_ids.unique():
        rows = group_ids == gid
        alone, _ = vgpo.vgpo_advantages(rewards[rows], group_ids[rows], focus[rows],
                                        mask[rows], has_image[rows])
        torch.testing.assert_close(alone, adv[rows])


def test_psi_averages_to_one_over_a_response_when_the_clamp_does_not_bite():
    rewards, group_ids, focus, mask, has_image = make_batch(seed=5)
    _, stats = vgpo.vgpo_advantages(rewards, group_ids, focus, mask, has_image)
    w_hat, psi = stats["w_hat"], stats["psi"]
    lengths = mask.sum(1)
    unclamped = 1 + w_hat - (w_hat * mask).sum(1, keepdim=True) / lengths.unsqueeze(1)
    inside = ((unclamped >= 0.1) & (unclamped <= 2.0) | ~mask).all(1)
    assert inside.sum() >= 10, "the batch should exercise the unclamped case"
    mean_psi = (psi * mask).sum(1) / lengths
    torch.testing.assert_close(mean_psi[inside], torch.ones(int(inside.sum())))


def test_alpha_averages_to_one_over_a_group_when_the_clamp_does_not_bite():
    # one response far more visual than 15 similar siblings: φ̂ = [1, ~0, ...] keeps
    # every 1 + φ̂ - mean inside [0.9, 2], so no clamp bites
    g = torch.Generator().manual_seed(6)
    for _ in range(20):
        phi = torch.cat([torch.tensor([20.0]), 5 + 0.5 * torch.rand(15, generator=g)])
        index, counts = torch.zeros(16, dtype=torch.long), torch.tensor([16])
        alpha = vgpo.inter_weights(phi, index, counts)
        phi_hat = (phi - phi.min()) / (phi.max() - phi.min() + 1e-8)
        assert ((1 + phi_hat - phi_hat.mean()) >= 0.9).all()
        torch.testing.assert_close(alpha.mean(), torch.tensor(1.0))
        assert alpha.argmax() == 0


def test_all_switches_off_is_exactly_grpo():
    rewards, group_ids, focus, mask, has_image = make_batch(seed=7)
    adv, _ = vgpo.vgpo_advantages(rewards, group_ids, focus, mask, has_image,
                                  intra=False, inter=False, compensation=False, gate=False)
    grpo = vgpo.grpo_advantages(rewards, group_ids)
    assert torch.equal(adv, torch.where(mask, grpo.unsqueeze(1), 0.0))


def test_grpo_advantages_by_hand():
    adv = vgpo.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3]),
                               torch.tensor([0, 0, 1, 1, 2, 2]))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert (adv[4:] == 0).all(), "0.3 + 0.3 has rounding noise; equal rewards must give exactly 0"


# -----------------------------------------------------------------------------
# 3. gate and compensation

def test_the_gate_picks_exactly_k_tail_tokens_when_there_are_no_ties():
    g = torch.Generator().manual_seed(8)
    N, T, kappa, gamma = 32, 50, 0.2, 0.5
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    w = torch.rand(N, T, generator=g)
    G = vgpo.visual_gate(w, mask, kappa, gamma)
    for i in range(N):
        L = int(lengths[i])
        tail_start = math.floor(gamma * L)
        k = max(1, math.floor(kappa * (L - tail_start)))
        picked = G[i].nonzero().flatten().tolist()
        assert len(picked) == k
        top = (w[i, tail_start:L].topk(k).indices + tail_start).tolist()
        assert sorted(picked) == sorted(top)


def test_the_gate_keeps_ties_at_the_threshold():
    w = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.7, 0.2]])
    G = vgpo.visual_gate(w, torch.ones_like(w, dtype=torch.bool), kappa=0.2, gamma=0.5)
    assert G.tolist() == [[False, False, False, True, True, False]]


def test_linear_compensation_is_zero_at_the_first_token_and_beta_at_the_last():
    lengths = torch.tensor([2, 5, 17])
    mask = torch.arange(20).unsqueeze(0) < lengths.unsqueeze(1)
    c = vgpo.visual_compensation(mask, beta=0.3, schedule="linear")
    rows = torch.arange(3)
    assert (c[:, 0] == 0).all()
    torch.testing.assert_close(c[rows, lengths - 1], torch.full((3,), 0.3))
    assert (c[~mask] == 0).all()
    assert (c[:, 1:][mask[:, 1:]] > 0).all(), "linear grows from the first token on"


# -----------------------------------------------------------------------------
# 4. policy loss

def test_policy_loss_equals_the_hand_computed_value_with_each_clip_active():
    # token 1: A=+1, ρ=1.5 -> upper clip, loss -1.28      token 2: A=-1, ρ=0.5 -> lower clip, 0.8
    # token 3: A=-1, ρ=4   -> dual clip at c=3, loss 3    token 4: A=+2, ρ=1   -> -2
    ratio = torch.tensor([[1.5, 0.5, 4.0, 1.0]])
    old = torch.full((1, 4), -1.0)
    logp = (old + ratio.log()).requires_grad_()
    A = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = vgpo.policy_loss(logp, old, A, mask)
    torch.testing.assert_close(loss, torch.tensor((-1.28 + 0.8 + 3.0 - 2.0) / 4))
    for key in ("clipfrac_upper", "clipfrac_lower", "clipfrac_dual"):
        torch.testing.assert_close(m[key], torch.tensor(0.25))
    loss.backward()
    # clipped tokens carry no gradient; the free one carries -A ρ / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0, -0.5]]))


def test_policy_loss_gradient_does_not_depend_on_micro_batch_size():
    g = torch.Generator().manual_seed(11)
    N, T = 12, 16
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(N, T, generator=g) * 3
    logp = (old + 0.3 * torch.randn(N, T, generator=g)).requires_grad_()
    A = torch.randn(N, T, generator=g)
    full, _ = vgpo.policy_loss(logp, old, A, mask)
    (grad_full,) = torch.autograd.grad(full, logp)
    num_tokens = mask.sum()
    for micro in (1, 3, 5):
        total = sum(vgpo.policy_loss(logp[i:i + micro], old[i:i + micro], A[i:i + micro],
                                     mask[i:i + micro], num_tokens=num_tokens)[0]
                    for i in range(0, N, micro))
        (grad_micro,) = torch.autograd.grad(total, logp)
        torch.testing.assert_close(total, full)
        torch.testing.assert_close(grad_micro, grad_full)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(vgpo.kl_penalty(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(vgpo.kl_penalty(logp, ref, "k2"), torch.tensor([[0.125, 0.5]]))
    d = torch.tensor([[-0.5, 1.0]])
    torch.testing.assert_close(vgpo.kl_penalty(logp, ref), d.exp() - d - 1)


# -----------------------------------------------------------------------------
# 5. visual focus

def _hidden(dtype, seed=12):
    g = torch.Generator().manual_seed(seed)
    N, T, P, D = 3, 7, 9, 64
    resp = torch.randn(N, T, D, generator=g)
    prompt = torch.randn(N, P, D, generator=g)
    image_mask = torch.rand(N, P, generator=g) < 0.5
    image_mask[:, 2] = True                                              # >= 1 image token
    return resp.to(dtype), prompt.to(dtype), image_mask, resp, prompt


@pytest.mark.parametrize("chunk", [64, 3])                           # 3: T = 7 splits 3+3+1
def test_visual_focus_equals_a_per_token_cosine_loop(chunk):
    resp, prompt, image_mask, _, _ = _hidden(torch.float32)
    torch.testing.assert_close(vgpo.visual_focus(resp, prompt, image_mask, chunk=chunk),
                               naive_visual_focus(resp, prompt, image_mask))
    v = prompt.masked_fill(~image_mask.unsqueeze(-1), 0).sum(1) / image_mask.sum(1, keepdim=True)
    torch.testing.assert_close(vgpo.visual_prototype(prompt, image_mask, chunk=chunk), v)


def test_visual_focus_on_bf16_inputs_is_within_1e2_of_float32():
    resp, prompt, image_mask, resp32, prompt32 = _hidden(torch.bfloat16)
    s = vgpo.visual_focus(resp, prompt, image_mask)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, naive_visual_focus(resp32, prompt32, image_mask),
                               atol=1e-2, rtol=0)


# -----------------------------------------------------------------------------
# bad input: a ValueError naming the argument, never a silent NaN

def test_bad_input_raises_a_clear_error():
    rewards, group_ids, focus, mask, has_image = make_batch()
    call = vgpo.vgpo_advantages
    with pytest.raises(ValueError, match="response_mask"):
        call(rewards, group_ids, focus, mask[:, :-1])
    with pytest.raises(ValueError, match="group_ids"):
        call(rewards, group_ids[:-1], focus, mask)
    with pytest.raises(ValueError, match="single response"):
        call(rewards[:3], torch.tensor([1, 1, 2]), focus[:3], mask[:3])
    with pytest.raises(ValueError, match="rewards"):
        call(torch.where(torch.arange(len(rewards)) == 2, float("nan"), rewards),
             group_ids, focus, mask)
    inf_focus = focus.clone()
    inf_focus[0, 0] = float("inf")                                       # a valid token
    with pytest.raises(ValueError, match="focus"):
        call(rewards, group_ids, inf_focus, mask)
    with pytest.raises(ValueError, match="rewards"):
        call(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4),
             torch.zeros(0, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="schedule"):
        call(rewards, group_ids, focus, mask, schedule="cosine")
    with pytest.raises(ValueError, match="left-aligned"):
        call(rewards, group_ids, focus, mask.flip(1))
    with pytest.raises(ValueError, match="has_image"):
        call(rewards, group_ids, focus, mask, torch.arange(len(rewards)) % 2 == 0)
    with pytest.raises(ValueError, match="rewards"):
        vgpo.grpo_advantages(torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="image_mask"):
        vgpo.visual_focus(torch.zeros(2, 3, 8), torch.zeros(2, 5, 8),
                          torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_tokens"):
        vgpo.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                         torch.zeros(1, 2, dtype=torch.bool))


# =============================================================================
# rollout and training (the embedded tiny model, CPU)

import json
import os
import shutil
import subprocess
import sys
import types

import checkpoints
import dataset
import decode
import models
import parallel
import rollout
import tiny
import config
import train


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    return (AutoModelForImageTextToText.from_pretrained(tiny_model_dir),
            AutoProcessor.from_pretrained(tiny_model_dir))


# a few cheap steps: small batches, tiny validation
FAST = ["--task", "count", "--rollout_batch", "8", "--mini_batch", "4", "--group_size", "8",
        "--val_size", "16", "--val_every", "2", "--save_every", "2", "--max_tries", "4"]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_response_mask_stops_at_the_first_eos_by_position_even_when_pad_is_eos():
    EOS = 9
    responses = torch.tensor([[5, 6, EOS, EOS, EOS],    # pad == EOS after the real EOS
                              [EOS, 1, 2, 3, 4],        # EOS first: a length-1 response
                              [1, 2, 3, 4, 5]])         # no EOS: truncated, all valid
    mask, truncated = rollout.response_mask_from_eos(responses, [EOS])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_repeating_prompts_keeps_each_rows_images_in_order(tiny_model):
    _, processor = tiny_model
    g = torch.Generator().manual_seed(0)
    examples = []
    for k, n_images in enumerate([2, 1, 1]):
        ex = tiny.counting_example(7, k)
        side = [56, 84, 112][k]                                          # different grids
        images = [tiny.counting_example(8, 10 * k + j)["images"][0].resize((side, side))
                  for j in range(n_images)]
        examples.append({"problem": "<image>" * n_images + "How many?", "answer": ex["answer"],
                         "images": images})
    batch, images_per_row = rollout.encode_prompts(processor, examples, "")
    rows = torch.tensor([2, 0, 0, 1, 2, 1])                              # any order, repeats
    got, got_images = rollout.take_rows(batch, images_per_row, rows)
    want, want_images = rollout.encode_prompts(processor, [examples[r] for r in rows.tolist()], "")
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert torch.equal(got_images, want_images)


def test_sampled_responses_never_contain_vision_or_chat_control_tokens(tiny_model):
    model, processor = tiny_model
    examples = [tiny.counting_example(3, i) for i in range(32)]
    batch, _ = rollout.encode_prompts(processor, examples, "")
    banned = torch.tensor(rollout.suppressed_ids(model, processor))
    for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>"):
        assert processor.tokenizer.convert_tokens_to_ids(t) in banned
    torch.manual_seed(0)
    responses, mask, _ = rollout.generate(model, processor, batch, max_new_tokens=16)
    assert not torch.isin(responses[mask], banned).any()
    # the check can fail: the same random model, unconstrained, does emit them
    torch.manual_seed(0)
    free = model.generate(**batch, max_new_tokens=16, do_sample=True, suppress_tokens=None)
    assert torch.isin(free[:, batch["input_ids"].shape[1]:], banned).any()


def test_grading_extracts_the_last_box_and_uses_the_graders():
    assert rollout.last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert rollout.grade("\\frac{1}{2}", "0.5") and rollout.grade("3.0", "3")
    assert not rollout.grade("4", "3") and not rollout.grade(None, "3")
    assert rollout.grade("(B) 12 cm", "B") and rollout.grade("B", "B")
    assert not rollout.grade("NONE", "E"), "a letter is never matched by substring"
    assert rollout.extract_answer("I think 3") is None, "real tasks need a box"
    assert rollout.extract_answer("I think 3", bare=True) == "3"


def test_a_chain_of_counts_is_graded_exactly_not_as_a_product_of_symbols():
    # math-verify reads "r1g2b3" as r*1*g*2*b*3 = 6rgb, the same product as the gold's r*2*g*1*b*3:
    # a wrong chain of the colour task, or its steps in another order, must not be rewarded
    for wrong in ("r1g2b3", "r3g1b2", "g1r2b3", "r6g1b1", "R2G1B3"):
        assert not rollout.grade(wrong, "r2g1b3"), wrong
    assert rollout.grade("r2g1b3", "r2g1b3") and rollout.grade(" r2g1b3 ", "r2g1b3")
    assert rollout.accuracy_rewards(["\\boxed{r1g2b3}", "\\boxed{r2g1b3}"], ["r2g1b3"] * 2) == [0.0, 1.0]
    # the math graders still decide everything else
    assert rollout.grade("\\frac{1}{2}", "0.5") and rollout.grade("x^2+1", "1+x^2")


def test_a_pair_graded_once_is_not_sent_to_the_math_graders_again(monkeypatch):
    # math-verify runs sympy on every pair it is given, some milliseconds each, and the answers
    # of a group repeat: grade remembers each (answer, gold) pair it has decided
    import math_verify
    calls = []
    verify = math_verify.verify
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: calls.append(a) or verify(*a, **k))
    rollout._grade_text.cache_clear()
    results = [rollout.grade("\\sqrt{5}", "2") for _ in range(5)] + [rollout.grade("\\sqrt{6}", "2")]
    assert results == [False] * 6 and len(calls) == 2, "each new pair once, a repeated one never"
    assert rollout.grade("\\frac{1}{2}", 0.5), "a gold that is not a string is graded as its text"
    assert rollout._grade_text.cache_info().hits == 4


def test_a_few_training_steps_change_the_weights_and_keep_losses_finite(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    out = str(tmp_path / "run")
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2"] + FAST)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert sum(r["updates"] for r in rows) > 0
    assert all(math.isfinite(r["loss"]) for r in rows if r["updates"])
    assert "val_acc" in rows[-1] and "psi_mean" in rows[-1] and "focus_late" in rows[-1]
    assert 0.1 < rows[-1]["peak_mem_gb"] < 24                     # this process's peak, in GB
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(os.path.join(out, "checkpoints", "step_000002", "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert (any("visual" in k for k in changed)
            and any("language_model" in k or "layers" in k for k in changed))
    # on a CPU, --sample_dtype auto samples with the float32 policy itself, and says so
    with open(os.path.join(out, "checkpoints", "step_000002", "vgpo_config.json")) as f:
        assert json.load(f)["sample_dtype"] == "float32"


def test_a_resumed_run_logs_the_same_metrics_as_an_uninterrupted_one(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = ["--model", tiny_model_dir] + FAST
    train.main(common + ["--out_dir", full, "--max_steps", "4"])
    train.main(common + ["--out_dir", part, "--max_steps", "2"])
    train.main(common + ["--out_dir", part, "--max_steps", "4", "--resume"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "peak_mem_gb")} for r in rows]
    assert strip(read_metrics(part)) == strip(read_metrics(full))
    a = load_file(os.path.join(full, "checkpoints", "step_000004", "model.safetensors"))
    b = load_file(os.path.join(part, "checkpoints", "step_000004", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_torchrun_keeps_both_ranks_weights_identical(tiny_model_dir, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "train.py", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2"] + FAST
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert sum(r["updates"] for r in rows) > 0
    assert rows[-1]["replica_divergence"] == 0.0


# ---- FSDP2 (--fsdp): the same numbers as one process ----

def torchrun(args, timeout=600):
    """Run `python -m torch.distributed.run --nproc_per_node 2 <args>` in this folder (gloo, CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517"] + args
    result = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def fixed_rollout(processor, groups):
    """Groups of 8 responses to counting prompts: random tokens, lengths 1-6, mixed rewards.

    The same group id always gives the same rows, whichever process builds it.
    """
    if not groups:
        return rollout.Rollout.empty()
    batch, images_per_row = rollout.encode_prompts(processor,
                                                   [tiny.counting_example(7, g) for g in groups], "")
    rows = torch.arange(len(groups)).repeat_interleave(8)
    responses, mask, acc = [], [], []
    for g in groups:
        gen = torch.Generator().manual_seed(100 + g)
        lengths = torch.randint(1, 7, (8,), generator=gen)
        responses.append(torch.randint(3, 60, (8, 6), generator=gen))
        mask.append(torch.arange(6) < lengths.unsqueeze(1))
        acc.append(((torch.arange(8) + g) % 3 == 0).float())
    return rollout.Rollout(prompts=rollout.take_rows(batch, images_per_row, rows)[0],
                           images_per_row=images_per_row[rows],
                           responses=torch.cat(responses), mask=torch.cat(mask), reward=torch.cat(acc),
                           group_ids=torch.tensor(groups).repeat_interleave(8))


def one_update(model_dir, groups, mini_batches, fsdp, world=1):
    """One update_policy call on this rank's `groups` of the fixed rollout (4 groups in all).

    Returns (the logged sums, the full weights after the update; under FSDP on rank 0).
    """
    args = train.parse_args(["--task", "count", "--model", model_dir, "--rollout_batch", "4",
                             "--group_size", "8", "--mini_batch", str(4 // mini_batches),
                             "--micro_batch", "8"] + ["--fsdp"] * fsdp)
    device = torch.device("cpu")
    model, processor, _ = models.load_model(model_dir, args, device, move=not fsdp)
    policy = rollout.Policy(model)
    if fsdp:
        parallel.shard(policy, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    # plain SGD at lr 1: the weights move by exactly the (clipped) gradient, so the weights
    # compare the gradients themselves. AdamW's first step, g / (|g| + 1e-8), would turn
    # float rounding on a gradient near 1e-8 into a weight difference of up to lr, and
    # would hide a gradient of the wrong scale
    optimizer = torch.optim.SGD(params, lr=1.0)
    roll = fixed_rollout(processor, groups)
    with parallel.full_weights(policy):                 # gathers: every rank enters it
        roll.old_logp, focus = train.score_rollouts(policy, roll, args, device)
    roll.adv, _ = train.token_advantages(roll, focus, {})
    probe = parallel.fsdp_probe(processor, tiny.CountingTask(3, 4), args) if fsdp else None
    ranks = parallel.Ranks(int(os.environ.get("RANK", 0)), world, device)
    sums = train.update_policy(policy, optimizer, params, roll, args, ranks, probe=probe)
    assert sums.pop("updates") == mini_batches
    if not fsdp:
        return sums, model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sums, {k.removeprefix("model."): v for k, v in weights.items()}


# how the 4 groups are split between the 2 ranks: (rank 0, rank 1, mini-batches). With
# 3 + 1 groups rank 1 runs the zero-loss probe twice; with 4 + 0 it holds no rollout at all.
# With 0, 2, 3 + 1 in 2 mini-batches, each mini-batch is cut from both ranks' groups in stream
# order ({0, 1} then {2, 3}), as on one process, not from each rank's own list.
FSDP_SPLITS = [([0, 1, 2], [3], 1), ([0, 1, 2, 3], [], 2), ([0, 2, 3], [1], 2)]


def fsdp_worker(model_dir, out):
    """A rank of test_fsdp_..._matches_one_process (run under torchrun)."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = [one_update(model_dir, split[rank], mini_batches, fsdp=True, world=2)
               for *split, mini_batches in FSDP_SPLITS]
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def fsdp_unit_forwards(calls):
    """A global forward pre-hook that counts forwards of FSDP units (each runs FSDP's hooks)."""
    from torch.distributed.fsdp import FSDPModule
    return torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(1) if isinstance(module, FSDPModule) else None)


def hook_free_worker(model_dir, out):
    """A rank of test_sampling_under_fsdp_...: sample through the FSDP policy and its twin."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    args = train.parse_args(["--task", "count", "--model", model_dir, "--fsdp"])
    model, processor, _ = models.load_model(model_dir, args, torch.device("cpu"), move=False)
    policy = rollout.Policy(model)
    parallel.shard(policy, torch.device("cpu"))
    twin = parallel.sampling_copy(policy, args)
    assert twin is not policy and not parallel.fsdp_units(twin)
    examples = [tiny.counting_example(4, i) for i in range(3)]
    batch, images_per_row = rollout.encode_prompts(processor, examples, "")
    batch, _ = rollout.take_rows(batch, images_per_row, torch.arange(3).repeat_interleave(4))
    results = {}
    for name in ("fsdp", "twin"):
        calls = []
        with parallel.full_weights(policy):
            sampler = policy if name == "fsdp" else parallel.sampling_weights(twin, policy)
            if name == "twin":                      # the gathered tensors themselves, not a copy
                shared = dict(policy.model.named_parameters())
                assert all(p.data_ptr() == shared[n].data_ptr() for n, p in sampler.model.named_parameters())
            torch.manual_seed(dist.get_rank())
            hook = fsdp_unit_forwards(calls)
            responses, mask, _ = sampler.generate(processor, batch, max_new_tokens=6, temperature=1.0)
            hook.remove()
        results[name] = (responses, mask, len(calls))
    # validation's greedy answers and their focus (train.validate) through the twin, too
    examples = [tiny.colour_example(2, i) for i in range(3)]
    answers, calls = {}, []
    for name in ("fsdp", "twin"):
        with parallel.full_weights(policy):
            answerer = policy if name == "fsdp" else parallel.sampling_weights(twin, policy)
            hook = fsdp_unit_forwards(calls) if name == "twin" else None
            answers[name] = rollout.answer_greedily(answerer, processor, examples, "", max_new_tokens=6,
                                                    bare=False, device=torch.device("cpu"), focus=True)
            if hook:
                hook.remove()
    assert calls == []
    assert [a["response"] for a in answers["fsdp"]] == [a["response"] for a in answers["twin"]]
    for a, b in zip(answers["fsdp"], answers["twin"]):
        torch.testing.assert_close(a["focus"], b["focus"])
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def test_sampling_under_fsdp_runs_no_fsdp_hook_and_draws_the_same_responses(tiny_model_dir, tmp_path):
    out = str(tmp_path / "hooks.pt")
    torchrun(["test_vgpo.py", "hook_free_worker", tiny_model_dir, out])
    results = torch.load(out)
    (responses, mask, fsdp_calls), (twin_responses, twin_mask, twin_calls) = results["fsdp"], results["twin"]
    assert torch.equal(responses, twin_responses) and torch.equal(mask, twin_mask)
    # through the FSDP policy every decoded token runs every unit's hooks; through the twin none
    assert fsdp_calls >= 6 * (models.read_model_config(tiny_model_dir, train.parse_args([])).text_config
                              .num_hidden_layers) and twin_calls == 0


def one_load_worker(model_dir, out):
    """A rank of test_under_fsdp_only_rank_0_reads_...: load as train.py does under --fsdp."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForImageTextToText
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reads, original = [], AutoModelForImageTextToText.from_pretrained
    AutoModelForImageTextToText.from_pretrained = lambda *a, **k: reads.append(1) or original(*a, **k)
    args = train.parse_args(["--task", "count", "--model", model_dir, "--fsdp"])
    model, processor, _ = models.load_model(model_dir, args, torch.device("cpu"), move=False,
                                            weights=rank == 0)
    assert all(p.is_meta for p in model.parameters()) == (rank == 1)
    policy = rollout.Policy(model)
    parallel.shard(policy, torch.device("cpu"), from_rank0=True)
    weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))   # gathered
    roll = fixed_rollout(processor, [0, 1])
    prompts, responses, mask, _ = roll.micro(torch.arange(16), torch.device("cpu"))
    with parallel.full_weights(policy), torch.no_grad():
        logp, _ = policy.score(prompts, responses, mask)
    torch.save(dict(reads=len(reads), weights={k.removeprefix("model."): v for k, v in weights.items()},
                    buffers=dict(policy.model.named_buffers()), logp=logp), f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_under_fsdp_only_rank_0_reads_the_weights_and_every_rank_gets_its_shards(tiny_model, tiny_model_dir,
                                                                                 tmp_path):
    out = str(tmp_path / "load")
    torchrun(["test_vgpo.py", "one_load_worker", tiny_model_dir, out])
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert [r["reads"] for r in ranks] == [1, 0]                  # one read of the checkpoint in all
    model, processor = tiny_model
    roll = fixed_rollout(processor, [0, 1])
    prompts, responses, mask, _ = roll.micro(torch.arange(16), torch.device("cpu"))
    with torch.no_grad():
        want, _ = rollout.score(model, prompts, responses, mask)
    plain, buffers = model.state_dict(), dict(model.named_buffers())
    for r in ranks:
        assert r["weights"].keys() == plain.keys()
        assert all(torch.equal(r["weights"][k], v) for k, v in plain.items())
        # the rotary frequencies are buffers, in no state dict: rank 1 got them from rank 0
        assert r["buffers"].keys() == buffers.keys() and len(buffers) > 0
        assert all(torch.equal(r["buffers"][k], v) for k, v in buffers.items())
        torch.testing.assert_close(r["logp"], want, rtol=1e-5, atol=1e-6)


def hsdp_worker(model_dir, out):
    """A rank of test_on_two_nodes_...: one update with each of 4 ranks holding one group."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = one_update(model_dir, [rank], 2, fsdp=True, world=4)
    # the mesh shard() builds here, read off a freshly sharded policy
    policy = rollout.Policy(models.load_model(model_dir, train.parse_args(["--task", "count"]),
                                              torch.device("cpu"))[0])
    parallel.shard(policy, torch.device("cpu"))
    if rank == 0:
        torch.save((result, parallel.mesh_shape(policy)), out)
    dist.barrier()
    dist.destroy_process_group()


def test_on_several_nodes_the_memory_plan_divides_by_the_ranks_of_one_node(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert parallel.shard_group_size(16) == 8 and parallel.shard_group_size(8) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert parallel.shard_group_size(16) == 16                # no even 2-D mesh: one flat mesh
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert parallel.shard_group_size(4) == 4


def test_a_greedy_call_that_is_scored_after_holds_fewer_rows():
    from transformers import Qwen2_5_VLConfig
    config = Qwen2_5_VLConfig(**qwen25_vl_7b_config().to_dict())
    assert models.scoring_bytes(config) == 3 * 4 * 512 * 152064
    kv, prefill = models.token_costs(config)
    plain = models.GenerationBudget(40 * 2**30, kv, prefill, cap=256)
    scored = models.GenerationBudget(40 * 2**30, kv, 2 * prefill, 256, models.scoring_bytes(config))
    assert 1 <= scored.rows(1024, 2048) < plain.rows(1024, 2048) / 2
    assert scored.rows(1024, 2048) * scored.row_bytes(1024, 2048) <= 40 * 2**30


def test_on_two_nodes_fsdp_shards_within_a_node_and_matches_one_process(tiny_model_dir, tmp_path):
    # two torchrun launches of 2 ranks each, as two nodes of one job (--nnodes 2)
    out = str(tmp_path / "hsdp.pt")
    here = os.path.dirname(os.path.abspath(__file__))
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(node), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                               "--master_port", "29537", "test_vgpo.py", "hsdp_worker", tiny_model_dir, out],
                              cwd=here, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    logs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][1][-3000:] + logs[1][1][-3000:]
    (sums, weights), shape = torch.load(out)
    assert shape == (2, 2)                                   # 2 nodes x 2 ranks: a 2-D mesh
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want_sums, want_weights = one_update(tiny_model_dir, [0, 1, 2, 3], 2, fsdp=False)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-7)
    for k in want_weights:
        torch.testing.assert_close(weights[k], want_weights[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_two_process_fsdp_update_matches_one_process(tiny_model_dir, tmp_path):
    out = str(tmp_path / "fsdp.pt")
    torchrun(["test_vgpo.py", "fsdp_worker", tiny_model_dir, out])
    threads = torch.get_num_threads()
    # the reference runs with the ranks' one thread: a different thread count blocks the
    # matmuls differently
    torch.set_num_threads(1)
    try:
        results = [one_update(tiny_model_dir, first + second, mini_batches, fsdp=False)
                   for first, second, mini_batches in FSDP_SPLITS]
    finally:
        torch.set_num_threads(threads)
    for (sums, weights), (want_sums, want_weights) in zip(torch.load(out), results):
        # loss, clip fractions, approx_kl, entropy, kl, grad_norm: all are global over both ranks
        torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-7)
        assert sums["loss"] != 0 and sums["grad_norm"] > 0
        assert weights.keys() == want_weights.keys()
        # the gradient (SGD at lr 1), summed in another order on 2 ranks: each rank cuts its own
        # rows into micro-batches, longest first, so the micro-batches of 1 and 2 ranks hold
        # other rows; float32 rounding only
        for k in want_weights:
            torch.testing.assert_close(weights[k], want_weights[k], rtol=1e-5, atol=1e-6, msg=k)


def test_an_fsdp_run_resumes_exactly_and_saves_a_plain_checkpoint(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = ["train.py", "--fsdp", "--model", tiny_model_dir] + FAST
    torchrun(common + ["--out_dir", full, "--max_steps", "4"])
    # a run that stopped after its step-2 checkpoint, then resumed (on every rank)
    shutil.copytree(full, part)
    shutil.rmtree(os.path.join(part, "checkpoints", "step_000004"))
    with open(os.path.join(part, "checkpoints", "latest"), "w") as f:
        f.write("step_000002")
    torchrun(common + ["--out_dir", part, "--max_steps", "4", "--resume"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "peak_mem_gb")} for r in rows]
    assert strip(read_metrics(part)) == strip(read_metrics(full))
    assert sum(r["updates"] for r in read_metrics(full)) > 0
    ckpt = os.path.join(full, "checkpoints", "step_000004")
    a, b = load_file(os.path.join(ckpt, "model.safetensors")), \
        load_file(os.path.join(part, "checkpoints", "step_000004", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.listdir(os.path.join(ckpt, "optimizer"))                         # the sharded optimizer state
    # the consolidated weights load into a plain transformers model, as trained
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    for k, v in model.state_dict().items():
        if k in a:
            assert torch.equal(v, a[k]), k
    assert any(not torch.equal(a[k], start[k]) for k in start)


def test_under_fsdp_a_text_only_prompt_is_refused_by_row_or_counted(tiny_model, tmp_path):
    model, processor = tiny_model
    rows = counting_rows(3) + [{"problem": "How many squares?", "answer": "2"}]
    path = write_virl_rows(str(tmp_path / "d"), rows)
    data = dataset.Rows(dataset.load_table(path, "train", ("problem", "answer", "images")), path)
    flags = ["--fsdp", "--train_data", path, "--rollout_batch", "4", "--group_size", "2", "--mini_batch", "4",
             "--max_tries", "1"]
    def collect(args):
        bad_rows = dataset.BadRows("training data", args)
        _, counts = train.collect_rollouts(rollout.Policy(model), processor, data, dataset.PromptStream(4, 0),
                                           args, parallel.Ranks(), bad_rows)
        return bad_rows, counts
    with pytest.raises(SystemExit, match="row 3 has no image; under --fsdp"):
        collect(train.parse_args(flags))
    bad_rows, counts = collect(train.parse_args(flags + ["--skip_bad_rows"]))
    assert bad_rows.in_step == 1 and counts["sampled_groups"] == 3


def test_fsdp_refuses_to_start_without_torchrun(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="torchrun"):
        train.main(["--task", "count", "--fsdp", "--model", tiny_model_dir, "--out_dir", str(tmp_path / "x")])


# ---- bad input: each a clear message naming the file/row and the fix ----

def write_virl_rows(folder, rows):
    """A small ViRL39K-style jsonl with image files on disk, as the real path reads it."""
    os.makedirs(folder, exist_ok=True)
    records = []
    for k, row in enumerate(rows):
        paths = []
        for j, image in enumerate(row.get("images", [])):
            name = f"img_{k}_{j}.png"
            image.save(os.path.join(folder, name))
            paths.append(name)
        records.append({"problem": row["problem"], "answer": row.get("answer"), "images": paths})
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def counting_rows(n, seed=5):
    return [tiny.counting_example(seed, i) for i in range(n)]


def test_the_real_path_loader_trains_on_local_jsonl_and_parquet(tiny_model_dir, tmp_path):
    jsonl = write_virl_rows(str(tmp_path / "data"), counting_rows(12))
    import datasets
    parquet = str(tmp_path / "data" / "val.parquet")
    datasets.Dataset.from_list([{"problem": r["problem"], "answer": r["answer"],
                                 "images": [{"bytes": _png(r["images"][0]), "path": None}]}
                                for r in counting_rows(6, seed=6)]).to_parquet(parquet)
    rows = dataset.Rows(dataset.load_table(jsonl, "train", ("problem", "answer", "images")), jsonl)
    ex = rows[3]
    assert ex["answer"] == counting_rows(12)[3]["answer"] and ex["images"][0].size == (84, 84)
    out = str(tmp_path / "run")
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "1",
                "--train_data", jsonl, "--val_data", parquet] + FAST)
    assert read_metrics(out)[-1]["sampled_groups"] > 0 and "val_acc" in read_metrics(out)[-1]


def _png(image):
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_rows_are_errors_that_name_the_row_or_counted_skips(tiny_model_dir, tmp_path):
    good = counting_rows(8)
    path = write_virl_rows(str(tmp_path / "d"), good + [
        {"problem": "<image>How many squares?", "answer": None, "images": good[0]["images"]},
        {"problem": "<image><image>How many squares?", "answer": "2", "images": good[0]["images"]},
        {"problem": "<image>How many squares?", "answer": "1", "images": good[0]["images"]},
    ])
    os.remove(os.path.join(tmp_path, "d", "img_10_0.png"))               # row 10: missing file
    rows = dataset.Rows(dataset.load_table(path, "train", ("problem", "answer", "images")), path)
    with pytest.raises(dataset.BadRowError, match="row 8: no answer"):
        rows[8]
    with pytest.raises(dataset.BadRowError, match="row 9: 2 <image> placeholders .* but 1 images"):
        rows[9]
    with pytest.raises(dataset.BadRowError, match="row 10: image 0 cannot be opened"):
        rows[10]
    bad_rows = dataset.BadRows("training data", train.parse_args(["--task", "count", "--skip_bad_rows"]))
    kept = dataset.fetch_examples(rows, range(11), bad_rows)
    assert len(kept) == 8 and bad_rows.in_step == 3


def test_bad_datasets_models_and_flags_are_refused_clearly(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(Exception, match="empty|no column"):
        dataset.load_table(str(empty), "train", ("problem", "answer", "images"))
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"question": "x", "answer": "1", "images": []}) + "\n")
    with pytest.raises(ValueError, match="--problem_key"):
        dataset.load_table(str(nocol), "train", ("problem", "answer", "images"))
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "count", "--max_steps", "0"])
    assert "--max_steps 0 trains nothing" in capsys.readouterr().err
    # a model whose config has no image token id
    import shutil
    broken = str(tmp_path / "noimage")
    shutil.copytree(tiny_model_dir, broken)
    cfg_path = os.path.join(broken, "config.json")
    cfg = json.load(open(cfg_path))
    del cfg["image_token_id"]                     # falls back to a default outside the vocab
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="no usable image_token_id"):
        models.load_model(broken, train.parse_args(["--task", "count"]), torch.device("cpu"))


def test_resuming_another_runs_checkpoint_is_refused(tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "1"] + FAST)
    with pytest.raises(SystemExit, match="different run(.|\n)*--lr"):
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2",
                    "--resume", "--lr", "1e-4"] + FAST)
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2"]
                   + FAST)


# =============================================================================
# learning, and eval.py on a trained checkpoint

import benchmarks
import eval as evaluate


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """`python train.py` with every default (the README's main job), trained once."""
    out = str(tmp_path_factory.mktemp("trained") / "out")
    train.main(["--out_dir", out])
    return out


def test_the_default_job_reasons_step_by_step_and_learns_well_past_its_warm_start(trained_run):
    rows = read_metrics(trained_run)
    warm = json.load(open(os.path.join(trained_run, "tiny-init-warm", "warm_start.json")))
    # the warm start follows the format but is clearly imperfect on the answer: RL has headroom
    assert 0.2 <= rows[0]["start_val_acc"] <= 0.6
    # it stopped once it read the first step off the image (tiny.warm_start_done) ...
    assert warm["step_accuracy"][0] >= warm["target"] == 0.8
    # ... when its late steps still followed the prior: on held-out prompts, where the prior
    # tells nothing, the last step is well below the first (the phenomenon RL starts from)
    first, _, last = rows[0]["start_val_step_acc"]
    assert last <= first - 0.15, rows[0]["start_val_step_acc"]
    assert "val_step_acc" in rows[-1] and len(rows[-1]["val_step_focus"]) == 3
    # blank images: one answer to one input, whose probability under the prior is logged
    chances = [1 / 3 * a * b for a in (0.8, 0.1) for b in (0.8, 0.1)] + [0.0]
    assert any(rows[0]["start_val_blank_prior_acc"] == pytest.approx(p) for p in chances)
    assert rows[-1]["val_acc"] >= 0.8 and rows[-1]["val_acc"] >= rows[0]["start_val_acc"] + 0.3
    # every response is a chain of steps, not a digit: \boxed{r2g1b3} and its EOS
    assert statistics.mean(r["response_len"] for r in rows[-10:]) >= 12 and rows[-1]["val_len"] >= 12
    assert all(math.isfinite(r.get("loss", 0.0)) for r in rows)
    assert rows[-1]["val_focus_ratio"] > 0 and "focus_late" in rows[-1]


def test_eval_scores_the_trained_checkpoint_and_blank_images_fall_to_chance(trained_run, capsys):
    evaluate.main(["--ckpt", trained_run, "--image_ablation", "blank"])
    table = capsys.readouterr().out
    assert "| validation | 200 |" in table
    ckpt = checkpoints.latest_checkpoint(trained_run)
    summary = json.load(open(os.path.join(ckpt, "eval", "summary.json")))["validation"]
    assert summary["accuracy"] >= 0.8
    # with blank images the model can only guess: each count 1 in 3, the answer 1 in 27
    assert summary["accuracy_blank"] <= 0.1
    # the per-sample file recounts to the summary, failures and all
    preds = [json.loads(l) for l in open(os.path.join(ckpt, "eval", "predictions.jsonl"))]
    normal = [p for p in preds if "ablation" not in p]
    assert len(normal) == summary["n"] == 200
    assert sum(p["correct"] for p in normal) / len(normal) == summary["accuracy"]
    blank = [p for p in preds if p.get("ablation") == "blank"]
    assert sum(p["correct"] for p in blank) / len(blank) == summary["accuracy_blank"]


def test_eval_focus_and_plot_write_their_outputs(trained_run, tiny_model_dir, tmp_path, capsys):
    png = str(tmp_path / "focus.png")
    evaluate.main(["--ckpt", tiny_model_dir, trained_run, "--data", _eval_jsonl(tmp_path),
                   "--focus", "--plot", png, "--output_dir", str(tmp_path / "ev"), "--max_new_tokens", "4"])
    assert os.path.getsize(png) > 10_000 and open(png, "rb").read(4) == b"\x89PNG"
    table = capsys.readouterr().out
    assert table.count("| counting_local |") == 2 and "late-early" in table
    for name in ("model", os.path.basename(checkpoints.latest_checkpoint(trained_run))):
        s = json.load(open(tmp_path / "ev" / name / "summary.json"))["counting_local"]
        assert {"early", "middle", "late", "late_minus_early"} <= set(next(
            v for k, v in s.items() if k.startswith("focus_")))
        # focus against each token's image dependence, over every scored token
        assert -1 <= s["focus_dependence_spearman"] <= 1 and s["scored_tokens"] > 0
        assert s["mean_image_dependence"] >= 0


def _eval_jsonl(tmp_path, n=6, broken=()):
    """A local benchmark file: question/answer/images with image files next to it."""
    folder = tmp_path / "bench"
    folder.mkdir(exist_ok=True)
    lines = []
    for k in range(n):
        ex = tiny.counting_example(77, k)
        ex["images"][0].save(folder / f"{k}.png")
        lines.append({"problem": "How many squares?", "answer": ex["answer"], "images": [f"{k}.png"]})
    for k in broken:
        os.remove(folder / f"{k}.png")
    path = folder / "counting_local.jsonl"
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return str(path)


def test_eval_counts_an_unreadable_image_as_wrong_and_keeps_it_in_the_denominator(tiny_model_dir, tmp_path):
    evaluate.main(["--ckpt", tiny_model_dir, "--data", _eval_jsonl(tmp_path, broken=(1, 4)),
                   "--output_dir", str(tmp_path / "ev"), "--max_new_tokens", "2"])
    s = json.load(open(tmp_path / "ev" / "summary.json"))["counting_local"]
    preds = [json.loads(l) for l in open(tmp_path / "ev" / "predictions.jsonl")]
    assert s["n"] == 6 and s["image_failures"] == 2
    assert [p["id"] for p in preds if not p["image_ok"]] == [1, 4]
    assert all(not p["correct"] for p in preds if not p["image_ok"])


def test_eval_reads_a_local_copy_of_the_papo_benchmark_split(tiny_model_dir, tmp_path):
    root = tmp_path / "papo"
    (root / "images").mkdir(parents=True)
    rows = []
    for k in range(4):
        ex = tiny.counting_example(88, k)
        ex["images"][0].save(root / "images" / f"c{k}.png")
        rows.append({"messages": [{"role": "user", "content": "<image>How many squares?"},
                                  {"role": "assistant", "content": ex["answer"]}],
                     "images": [f"images/c{k}.png"]})
    (root / "BUAADreamer_clevr_count_70k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluate.main(["--ckpt", tiny_model_dir, "--bench", "counting", "--data_dir", str(root),
                   "--output_dir", str(tmp_path / "ev"), "--max_new_tokens", "2"])
    s = json.load(open(tmp_path / "ev" / "summary.json"))["counting"]
    assert s["n"] == 4 and s["image_failures"] == 0


def test_eval_bad_input_is_refused_clearly(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        evaluate.main(["--ckpt", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="unknown benchmark.*valid: mathvista"):
        evaluate.main(["--ckpt", tiny_model_dir, "--bench", "mathvistaa"])
    with pytest.raises(SystemExit, match="not a train.py checkpoint"):
        evaluate.main(["--ckpt", tiny_model_dir])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="PAPO-Galaxy/PAPO_eval.*--data_dir"):
        evaluate.main(["--ckpt", tiny_model_dir, "--bench", "geo3k"])
    nogold = tmp_path / "nogold.jsonl"
    nogold.write_text(json.dumps({"problem": "q", "answer": "", "images": []}) + "\n")
    with pytest.raises(SystemExit, match="sample 0: no gold answer"):
        evaluate.main(["--ckpt", tiny_model_dir, "--data", str(nogold)])


def test_grader_cases_from_the_evaluation_protocol():
    cases = {("\\frac{1}{2}", "0.5"): True, ("30^\\circ", "30"): True, ("30°", "30"): True,
             ("5 cm", "5"): True, ("None", "None"): True, ("NONE", "E"): False,
             ("E", "E"): True, ("(E)", "E"): True, ("E. 12", "E"): True, ("B", "E"): False,
             ("The answer is E", "E"): False, ("2\\sqrt{3}", "\\sqrt{12}"): True, ("4", "3"): False}
    assert {k: rollout.grade(*k) for k in cases} == cases


# =============================================================================
# memory-lean log-probs and micro-batching

def test_chunked_logprobs_equal_one_block_in_value_and_gradient():
    g = torch.Generator().manual_seed(21)
    lm_head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 11), generator=g)
    full = rollout.response_logprobs(lm_head, hidden, tokens, temperature=0.7, chunk=0)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    ref = torch.log_softmax(lm_head(hidden).float() / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(full, ref)
    for chunk in (1, 4, 11, 64):
        part = rollout.response_logprobs(lm_head, hidden, tokens, temperature=0.7, chunk=chunk)
        (g_part,) = torch.autograd.grad(part.sum(), hidden)
        torch.testing.assert_close(part, full)
        torch.testing.assert_close(g_part, g_full)


def test_a_training_step_does_not_depend_on_how_it_is_micro_batched(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    # Adam's update is blind to a gradient's scale, so the logged gradient norm and loss
    # (token means over the whole mini-batch) are compared, then the weights
    weights, logged = {}, {}
    for name, flags in {"one": ["--micro_batch", "64"], "rows5": ["--micro_batch", "5"],
                        "tokens": ["--micro_tokens", "150"], "chunk1": ["--logp_chunk", "1"]}.items():
        out = str(tmp_path / name)
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "1",
                    "--mini_batch", "8"]
                   + FAST[6:] + ["--rollout_batch", "8", "--group_size", "8"] + flags)
        row = read_metrics(out)[0]
        assert row["updates"] == 1
        logged[name] = torch.tensor([row["grad_norm"], row["loss"], row["entropy"]])
        weights[name] = load_file(os.path.join(out, "checkpoints", "step_000001", "model.safetensors"))
    for name in ("rows5", "tokens", "chunk1"):
        torch.testing.assert_close(logged[name], logged["one"], rtol=1e-5, atol=1e-7)
        for k in weights["one"]:
            torch.testing.assert_close(weights[name][k], weights["one"][k], atol=2e-5, rtol=1e-4)


def rollout_of_lengths(prompt_lengths, response_lengths):
    """A Rollout whose rows have these prompt and response lengths (left-padded prompts)."""
    width, longest = max(prompt_lengths), max(response_lengths)
    attention = torch.tensor([[0] * (width - p) + [1] * p for p in prompt_lengths])
    mask = torch.tensor([[1] * r + [0] * (longest - r) for r in response_lengths]).bool()
    n = len(prompt_lengths)
    return rollout.Rollout(prompts={"attention_mask": attention}, images_per_row=torch.zeros(n),
                           responses=mask.long(), mask=mask, reward=torch.zeros(n), group_ids=torch.arange(n))


def test_token_budget_packs_rows_longest_first():
    roll = rollout_of_lengths([20] * 4, [10, 10, 40, 5])                    # rows of 30, 30, 60, 25 tokens
    args = train.parse_args(["--task", "count", "--micro_tokens", "100"])
    parts = models.micro_batches(roll, torch.arange(4), args)
    # the 60 alone, then 3 rows padded to 30: 2 micro-batches, where packing in order takes 3
    assert [p.tolist() for p in parts] == [[2], [0, 1, 3]]


def test_micro_batches_put_rows_of_like_length_together():
    # in order, every micro-batch of 2 pairs a short row with a long one: half its response padded
    roll = rollout_of_lengths([20] * 4, [10, 40, 10, 40])
    args = train.parse_args(["--task", "count", "--micro_batch", "2"])
    assert models.padded_share(roll, list(torch.arange(4).split(2))) == pytest.approx(1 - 180 / 240)
    parts = models.micro_batches(roll, torch.arange(4), args)
    assert [p.tolist() for p in parts] == [[1, 3], [0, 2]]                  # 2 x 60 tokens, then 2 x 30
    assert models.padded_share(roll, parts) == 0
    # short prompts with long responses after long prompts with short ones: by prompt first,
    # so no micro-batch pairs a long prompt with a long response (by the sum it would: 47.5%)
    roll = rollout_of_lengths([30, 30, 1, 2], [1, 2, 31, 31])
    parts = models.micro_batches(roll, torch.arange(4), args)
    assert [p.tolist() for p in parts] == [[1, 0], [3, 2]] and models.padded_share(roll, parts) < 0.02
    # groups of 8 rows sharing a prompt, in stream order as the update gets them, 4 rows a
    # micro-batch as in the paper preset: every row once, and less padding than in order
    gen, mine, in_order = torch.Generator().manual_seed(0), 0.0, 0.0
    for _ in range(20):
        groups = int(torch.randint(1, 10, (), generator=gen))
        prompts = torch.randint(1, 30, (groups,), generator=gen).repeat_interleave(8)
        responses = torch.randint(1, 60, (8 * groups,), generator=gen)
        roll = rollout_of_lengths(prompts.tolist(), responses.tolist())
        rows = torch.arange(8 * groups)
        parts = models.micro_batches(roll, rows, train.parse_args(["--task", "count", "--micro_batch", "4"]))
        assert sorted(torch.cat(parts).tolist()) == rows.tolist()
        mine += models.padded_share(roll, parts)
        in_order += models.padded_share(roll, list(rows.split(4)))
    assert mine < 0.8 * in_order


# =============================================================================
# the real recipe on first contact: fixtures that reproduce the real artefacts

import smoke


@pytest.fixture(scope="session")
def qwen_shipped_config_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with the generation settings the real 7B checkpoint ships."""
    path = str(tmp_path_factory.mktemp("qwen_gen") / "model")
    shutil.copytree(tiny_model_dir, path)
    return smoke.write_shipped_generation_config(path)


def test_sampling_ignores_the_generation_settings_a_checkpoint_ships(qwen_shipped_config_dir, tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(qwen_shipped_config_dir)
    processor = AutoProcessor.from_pretrained(qwen_shipped_config_dir)
    assert model.generation_config.top_k == 1 and model.generation_config.repetition_penalty == 1.05
    # G = 8 samples of one prompt at temperature 1: distinct, not one greedy answer 8 times
    batch, images_per_row = rollout.encode_prompts(processor, [tiny.counting_example(3, 0)], "")
    group, _ = rollout.take_rows(batch, images_per_row, torch.zeros(8, dtype=torch.long))
    torch.manual_seed(0)
    responses, mask, _ = rollout.generate(model, processor, group, max_new_tokens=12, temperature=1.0,
                                          top_p=1.0)
    assert len({tuple(r[m].tolist()) for r, m in zip(responses, mask)}) >= 6
    # greedy decoding equals plain argmax decoding: no repetition penalty, no top-k
    examples = [tiny.counting_example(4, i) for i in range(16)]
    batch, _ = rollout.encode_prompts(processor, examples, "")
    used = []                                   # the settings generate() resolves, as it resolves them
    prepare = model._prepare_generation_config
    model._prepare_generation_config = lambda *a, **k: used.append(prepare(*a, **k)[0]) or prepare(*a, **k)
    greedy, gmask, _ = rollout.generate(model, processor, batch, max_new_tokens=12, temperature=0)
    del model._prepare_generation_config
    assert not used[0].do_sample and used[0].repetition_penalty == 1.0 and not used[0].top_k
    banned = rollout.suppressed_ids(model, processor)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    want = []
    with torch.no_grad():
        for _ in range(12):                                   # a naive loop, full forward each token
            extra = {"mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros(
                len(ids), ids.shape[1] - inputs["mm_token_type_ids"].shape[1], dtype=torch.long)], 1)}
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False,
                           **dict(inputs, **extra)).logits[:, -1].float()
            logits[:, banned] = -float("inf")
            nxt = logits.argmax(-1, keepdim=True)
            want.append(nxt)
            ids, attn = torch.cat([ids, nxt], 1), torch.cat([attn, torch.ones_like(nxt)], 1)
    want = torch.cat(want, 1)
    assert torch.equal(torch.where(gmask, greedy, -1), torch.where(gmask, want[:, :greedy.shape[1]], -1))


def test_cpu_tensors_have_a_backend_in_the_gpu_process_group():
    # NCCL has no CPU backend: counters and statistics on CPU tensors need gloo beside it.
    # A CPU cannot create an NCCL group, so the backend string is checked as torch parses it.
    from torch.distributed.distributed_c10d import BackendConfig
    spec = parallel.process_group_backend(cuda=True)
    mapping = BackendConfig(spec).get_device_backend_map()
    assert mapping["cpu"] == "gloo" and mapping["cuda"] == "nccl"
    assert parallel.process_group_backend(cuda=False) == "gloo"


def _rank_reward_script(tmp_path):
    """train.py under torchrun, where rank 1's rewards are all equal (no informative group)."""
    script = tmp_path / "uneven.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import rollout, train\n"
        "def rewards(texts, golds, bare=False):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        return [0.0] * len(texts)\n"
        "    return [float(k % 2) for k in range(len(texts))]\n"
        "rollout.accuracy_rewards = rewards\n"
        # each rank's group ids (stream positions) of every round, one line a round
        "import dataset, json\n"
        "fetch = dataset.fetch_examples\n"
        "def logged(*args, **kwargs):\n"
        "    out = fetch(*args, **kwargs)\n"
        f"    with open({str(tmp_path / 'groups.')!r} + os.environ['RANK'], 'a') as f:\n"
        "        f.write(json.dumps([e['group'] for e in out]) + '\\n')\n"
        "    return out\n"
        "dataset.fetch_examples = logged\n"
        "train.main(sys.argv[1:])\n")
    return str(script)


@pytest.mark.parametrize("flags", [[], ["--kl_coef", "0.01"], ["--fsdp"], ["--fsdp", "--kl_coef", "0.01"]],
                         ids=["plain", "kl", "fsdp", "fsdp_kl"])
def test_a_rank_without_informative_groups_runs_the_same_collectives(tiny_model_dir, tmp_path, flags):
    out = str(tmp_path / "run")
    torchrun([_rank_reward_script(tmp_path), "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2",
              "--max_tries", "2"] + FAST[:-2] + flags, timeout=240)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    # pooled dynamic sampling: rank 0 alone fills the batch of 8 groups, in a round of 8 prompts
    # and one of 16 (the 4 missing at the keep rate 1/2, with margin, capped at twice the batch),
    # and every drawn prompt is sampled (none is drawn by a rank that is full and thrown away)
    assert all(r["kept_groups"] == 8 and r["updates"] == 2 and r["tries"] == 2 for r in rows)
    positions = [0] + [r["data_position"] for r in rows]
    drawn = [b - a for a, b in zip(positions, positions[1:])]
    assert [r["sampled_groups"] for r in rows] == drawn == [24, 24]
    assert all(math.isfinite(r["psi_mean"]) for r in rows)
    # each rank samples every other prompt of a round, so every stretch of the stream (and so
    # every mini-batch) is spread over both ranks: rank 0 the even positions, rank 1 the odd
    rounds = [[json.loads(line) for line in open(tmp_path / f"groups.{rank}")] for rank in (0, 1)]
    assert rounds[0][:2] == [[0, 2, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]]
    assert rounds[1][:2] == [[1, 3, 5, 7], [9, 11, 13, 15, 17, 19, 21, 23]]


def test_text_only_and_mixed_batches_score_and_train(tiny_model, tiny_model_dir, tmp_path):
    model, processor = tiny_model
    examples = [tiny.counting_example(5, 0), {"problem": "What is 2 + 1?", "answer": "3", "images": []},
                tiny.counting_example(5, 1), {"problem": "What is 1 + 1?", "answer": "2", "images": []}]
    batch, images_per_row = rollout.encode_prompts(processor, examples, "")
    responses = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.bool)
    for rows in ([1, 3], [0, 1]):                             # text only, then mixed
        got, _ = rollout.take_rows(batch, images_per_row, torch.tensor(rows))
        alone, _ = rollout.encode_prompts(processor, [examples[r] for r in rows], "")
        with torch.no_grad():
            logp, _ = rollout.score(model, got, responses, mask)
            want, _ = rollout.score(model, alone, responses, mask)
        torch.testing.assert_close(logp, want, rtol=1e-4, atol=1e-5)
    # a training run on text-only rows, and one on a mix of both
    text = [{"problem": f"What is {k % 4} + 1?", "answer": str(k % 4 + 1)} for k in range(8)]
    for name, rows in (("text", text), ("mixed", text[:4] + counting_rows(4))):
        path = write_virl_rows(str(tmp_path / name), rows)
        out = str(tmp_path / f"run_{name}")
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2",
                    "--train_data", path, "--val_data", path] + FAST)
        assert sum(r["sampled_groups"] for r in read_metrics(out)) >= 8


def test_scoring_builds_no_kv_cache(tiny_model):
    model, processor = tiny_model
    seen = []
    hook = model.model.language_model.register_forward_hook(
        lambda m, a, out: seen.append(out.past_key_values))
    try:
        batch, _ = rollout.encode_prompts(processor, [tiny.counting_example(5, 0)], "")
        with torch.no_grad():
            rollout.score(model, batch, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool))
    finally:
        hook.remove()
    assert seen == [None]


def qwen25_vl_7b_config():
    """Qwen2.5-VL-7B-Instruct's config.json values (the shapes that set its memory)."""
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=151655, video_token_id=151656, tie_word_embeddings=False)


def test_the_memory_plan_of_the_7b_preset_fits_one_node_of_80gb_cards():
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen25_vl_7b_config())
    n_params = sum(p.numel() for p in model.parameters())
    assert 8.2e9 < n_params < 8.4e9
    args = train.parse_args(["--task", "count", "--preset", "paper7b"])
    plan = models.memory_plan(model.config, n_params, n_params, args, world=8, capacity=80 * 2**30)
    assert plan["kv_bytes_per_token"] == 28 * 2 * 4 * 128 * 2 == 57344          # 56 KiB a token, bf16
    assert plan["peak"] < 78 * 2**30, plan
    phases = sum(plan["rollout"].values()), sum(plan["update"].values())   # never at the same time
    assert plan["peak"] == sum(plan["static"].values()) + max(phases)
    models.check_memory(plan, 80 * 2**30, args)                               # fits: no error
    # rows per generate() call from the room the plan leaves: at ViRL39K's prompts (a few hundred
    # text tokens plus at least 334 image tokens at the preset's min_pixels) at least 128 rows
    budget = plan["budget"]
    assert budget.rows(1024, 2048) >= 128 and budget.rows(512, 2048) > budget.rows(1024, 2048)
    assert 1 <= budget.rows(4096, 2048) < 128                                 # the worst case still fits
    # what the rows cost is what the room holds: one more row would not fit. A group's 8
    # samples share one prefill, so a row pays an eighth of a prompt's transient, and a call
    # two prompts' more (it may start and end inside a group)
    rows = budget.rows(1024, 2048)
    call = lambda n: n * budget.kv * (1024 + 2048) + budget.prefill * 1024 * (n / 8 + 2)
    assert budget.share == 8 and call(rows) <= budget.room < call(rows + 1)
    assert budget.rows(1024, 2048) >= 256 and budget.rows(4096, 2048) >= 100
    # where every row is prefilled (a static cache), each pays a whole prompt's transient
    static = train.parse_args(["--task", "count", "--preset", "paper7b", "--decode_cache", "static"])
    alone = models.memory_plan(model.config, n_params, n_params, static, 8, 80 * 2**30)["budget"]
    n = alone.rows(1024, 2048)
    assert alone.share == 1
    assert n * alone.row_bytes(1024, 2048) <= alone.room < (n + 1) * alone.row_bytes(1024, 2048)
    assert 128 <= n < rows
    capped = train.parse_args(["--task", "count", "--preset", "paper7b", "--gen_batch", "64"])
    assert models.memory_plan(model.config, n_params, n_params, capped, 8, 80 * 2**30)["budget"].rows(
        1024, 2048) == 64                                                     # --gen_batch caps a call
    shown = models.format_plan(plan, 80 * 2**30, args)
    assert f"1024 -> {rows}" in shown and "4096 -> " in shown
    # responses so long that not one sequence fits a call stop before loading, naming the flags
    huge = train.parse_args(["--task", "count", "--preset", "paper7b", "--max_new_tokens", "1000000"])
    with pytest.raises(SystemExit, match="not even one sequence.*--max_new_tokens"):
        models.check_memory(models.memory_plan(model.config, n_params, n_params, huge, 8, 80 * 2**30),
                            80 * 2**30, huge)
    # --fsdp_offload on one GPU: the fp32 shards, AdamW state and gradients are in CPU memory
    one = train.parse_args(["--task", "count", "--preset", "paper7b", "--fsdp_offload"])
    offload = models.memory_plan(model.config, n_params, n_params, one, world=1, capacity=80 * 2**30)
    assert offload["peak"] < 78 * 2**30 and sum(offload["cpu"].values()) == 16 * n_params
    assert offload["budget"].rows(1024, 2048) >= 64
    with_ref = train.parse_args(["--task", "count", "--preset", "paper7b", "--kl_coef", "0.01"])
    ref_plan = models.memory_plan(model.config, n_params, n_params, with_ref, world=8, capacity=80 * 2**30)
    # the reference's fp32 shards: static memory the room for generation loses
    assert ref_plan["budget"].room == pytest.approx(budget.room - 4 * n_params / 8)


def test_generate_calls_pack_the_shortest_prompts_first_as_many_rows_as_the_budget_holds():
    unbounded = models.GenerationBudget(None, 1, 1, cap=2)
    assert [c.tolist() for c in unbounded.calls([9, 3, 5], 10)] == [[1, 2], [0]]
    assert [c.tolist() for c in unbounded.calls([9, 3], 10)] == [[0, 1]]        # one call: their own order
    assert unbounded.calls([], 10) == []
    # room for 100 bytes; a row costs (prompt + 10 new) + 2 x prompt bytes: 40 at prompt 10, 70 at 20
    budget = models.GenerationBudget(100, 1, 2, cap=8)
    assert budget.rows(10, 10) == 2 and budget.rows(20, 10) == 1
    calls = budget.calls([20, 10, 10, 10, 20], 10)
    assert [c.tolist() for c in calls] == [[1, 2], [3], [0], [4]]
    assert all(len(c) <= budget.rows(max([20, 10, 10, 10, 20][r] for r in c.tolist()), 10) for c in calls)


def test_sampling_makes_the_calls_the_budget_chose_and_returns_rows_in_their_order(tiny_model):
    model, processor = tiny_model
    examples = [tiny.counting_example(3, k) for k in range(3)]
    batch, images_per_row = rollout.encode_prompts(processor, examples, "")
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    args = train.parse_args(["--task", "count", "--max_new_tokens", "2"])
    sizes = []

    class Recorder:                                  # a policy whose answers name their prompt
        model = tiny_model[0]                        # a Qwen2.5-VL: each prompt once, with its samples

        def eval(self):
            pass

        def generate(self, processor, batch, repeats=None, **kw):
            sizes.append((len(batch["input_ids"]), repeats.tolist()))
            # each row's last prompt token, twice
            first = batch["input_ids"][:, -1:].repeat_interleave(repeats, dim=0).repeat(1, 2)
            return first, torch.ones_like(first, dtype=torch.bool), torch.zeros(len(first), dtype=torch.bool)
    length = int(batch["attention_mask"].sum(1).max())
    budget = models.GenerationBudget(4 * (length + 2), 1, 0, cap=512)       # 4 rows a call, at most
    responses, masks, _, row_steps = train.sample(Recorder(), processor, batch, images_per_row, rows, args,
                                                  torch.device("cpu"), budget)
    assert sizes == [(2, [2, 2]), (1, [2])] and row_steps == 6 * 2
    want = batch["input_ids"][rows, -1:].repeat(1, 2)
    assert torch.equal(responses, want) and masks.all()


def test_greedy_answers_split_by_a_budget_are_the_answers_of_one_call(tiny_model):
    model, processor = tiny_model
    examples = [tiny.colour_example(6, k) for k in range(5)]
    examples[3] = dict(examples[3], problem=examples[3]["problem"] + " Count carefully, step by step.")
    kw = dict(max_new_tokens=8, bare=False, device=torch.device("cpu"), focus=True)
    whole = rollout.answer_greedily(rollout.Policy(model), processor, examples, "", **kw)
    lengths = rollout.encode_prompts(processor, examples, "")[0]["attention_mask"].sum(1)
    budget = models.GenerationBudget(None, 1, 1, cap=2)                  # 2 prompts a call: 3 calls
    assert len(budget.calls(lengths, 8)) == 3
    parts = rollout.answer_greedily(rollout.Policy(model), processor, examples, "", budget=budget, **kw)
    assert [r["response"] for r in parts] == [r["response"] for r in whole]
    for a, b in zip(parts, whole):
        torch.testing.assert_close(a["focus"], b["focus"], rtol=1e-4, atol=1e-5)


def test_eval_loads_bf16_weights_when_asked_and_fp32_by_default(tiny_model_dir):
    args = train.parse_args(["--task", "count"])
    half, _, _ = models.load_model(tiny_model_dir, args, torch.device("cpu"), dtype=torch.bfloat16)
    full, _, _ = models.load_model(tiny_model_dir, args, torch.device("cpu"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(half.parameters(), full.parameters()))


def test_epochs_count_the_prompts_consumed(tiny_model_dir, tmp_path):
    path = write_virl_rows(str(tmp_path / "d"), counting_rows(16))
    out = str(tmp_path / "run")
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--train_data", path,
                "--max_steps", "-1", "--epochs", "1"] + FAST)
    rows = read_metrics(out)
    assert rows[-1]["data_position"] >= 16 > rows[-2]["data_position"] if len(rows) > 1 else True
    assert rows[-1]["data_position"] >= 16
    assert all(r["epoch"] == r["data_position"] / 16 for r in rows)
    # a step draws more than rollout_batch prompts when groups are filtered out
    drawn = [b["data_position"] - a["data_position"] for a, b in zip([{"data_position": 0}] + rows, rows)]
    assert all(d % 8 == 0 and d >= 8 for d in drawn)


def test_resume_refuses_every_changed_flag_that_changes_the_run(tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    common = ["--model", tiny_model_dir, "--out_dir", out] + FAST
    train.main(common + ["--max_steps", "1"])
    for flag, value in (("--temperature", "0.7"), ("--top_p", "0.9"), ("--max_new_tokens", "3"),
                        ("--max_prompt_len", "100"), ("--clip_high", "0.3"), ("--clip_low", "0.1"),
                        ("--ppo_epochs", "2"), ("--kl_kind", "k1"), ("--max_pixels", "100000"),
                        ("--min_pixels", "1000"), ("--grad_clip", "0.5"),
                        ("--bare_answers", "--no-bare_answers")):
        with pytest.raises(SystemExit, match=f"different run(.|\n)*{flag}"):
            train.main(common + ["--max_steps", "2", "--resume"]
                       + ([value] if value.startswith("--") else [flag, value]))


def test_the_paper_preset_reads_the_hub_datasets_as_they_are(tiny_model_dir, tmp_path):
    args = train.parse_args(["--task", "count", "--preset", "paper7b"])
    assert (args.train_data, args.train_split) == ("PAPOGalaxy/PAPO_ViRL39K_train", "train")
    assert (args.val_data, args.val_split) == ("PAPOGalaxy/PAPO_MMK12_test", "train")  # its only split
    assert ((args.temperature, args.top_p, args.group_size, args.rollout_batch, args.mini_batch)
            == (1.0, 0.99, 8, 512, 128))
    assert ((args.lr, args.weight_decay, args.epochs, args.max_new_tokens, args.max_prompt_len)
            == (1e-6, 1e-2, 2, 2048, 4096))
    assert ((args.min_pixels, args.max_pixels, args.beta, args.kappa, args.gamma)
            == (262144, 4194304, 0.3, 0.2, 0.5))
    virl, mmk12 = str(tmp_path / "PAPO_ViRL39K_train"), str(tmp_path / "PAPO_MMK12_test")
    smoke.write_hub_folder(virl, "train", smoke.virl_records(12, 5))
    smoke.write_hub_folder(mmk12, "train", smoke.virl_records(6, 6))
    rows = dataset.open_data(virl, "train", args, seed_offset=0, size=-1)   # marks mid-text, 2 images, LaTeX
    assert len(rows[2]["images"]) == 2 and rows[1]["problem"].startswith("Look at <image>")
    assert rows[3]["answer"].startswith("\\frac") and rollout.grade("1", rows[3]["answer"])
    out = str(tmp_path / "run")
    train.main(["--task", "count", "--preset", "paper7b", "--no-fsdp", "--model", tiny_model_dir,
                "--out_dir", out, "--train_data", virl, "--val_data", mmk12, "--max_steps", "1",
                "--min_pixels", "0", "--max_pixels", "0", "--max_new_tokens", "2",
                "--val_max_new_tokens", "2", "--lr", "1e-4", "--instruction", "", "--bare_answers",
                "--gradient_checkpointing"] + FAST[:6] + ["--val_size", "6"])
    assert read_metrics(out)[-1]["sampled_groups"] > 0 and "val_acc" in read_metrics(out)[-1]


# ---- the paper's benchmarks as they are on the hub ----

@pytest.mark.parametrize("layout", ["snapshot", "preprocessed"])
def test_eval_reads_the_papo_benchmarks_in_their_hub_and_preprocessed_layouts(tiny_model_dir, tmp_path,
                                                                               layout):
    root = smoke.write_papo_eval(str(tmp_path / "PAPO_eval"), layout)
    out = tmp_path / "ev"
    evaluate.main(["--ckpt", tiny_model_dir, "--bench", "counting", "wemath", "--data_dir", root,
                   "--output_dir", str(out), "--max_new_tokens", "2"])
    summary = json.load(open(out / "summary.json"))
    preds = [json.loads(l) for l in open(out / "predictions.jsonl")]
    for name in ("counting", "wemath"):
        assert summary[name]["n"] == 4 and summary[name]["image_failures"] == 0
        assert "question" in summary[name]["instruction"]        # PAPO's own, already in each question
    assert len(preds) == 8
    for p in preds:                                              # one instruction per prompt, not two
        assert p["prompt"].count("\\boxed{}") == 1 and p["prompt"].count("<think>") == 1


def test_eval_reports_failed_images_and_stops_when_most_fail(tiny_model_dir, tmp_path, capsys):
    root = smoke.write_papo_eval(str(tmp_path / "some"), "snapshot",
                                 splits=(("We_Math", "We-Math_We-Math_images.zip"),), missing=(2,))
    evaluate.main(["--ckpt", tiny_model_dir, "--bench", "wemath", "--data_dir", root,
                   "--output_dir", str(tmp_path / "ev"), "--max_new_tokens", "2"])
    table = capsys.readouterr().out
    assert "images failed" in table and "| wemath | 4 | 1 |" in table
    # the images left behind (a parquet file copied without its zips): an error, not a 0.0
    root = smoke.write_papo_eval(str(tmp_path / "none"), "snapshot",
                                 splits=(("We_Math", "We-Math_We-Math_images.zip"),))
    os.remove(os.path.join(root, "We-Math_We-Math_images.zip"))
    with pytest.raises(SystemExit, match="(?s)4 of 4 .*images.*zip.*--data_dir"):
        evaluate.main(["--ckpt", tiny_model_dir, "--bench", "wemath", "--data_dir", root,
                       "--output_dir", str(tmp_path / "ev2"), "--max_new_tokens", "2"])


def test_mathvista_testmini_multiple_choice_gold_becomes_its_option_letter(tmp_path):
    import datasets
    images = [tiny.counting_example(1, k)["images"][0] for k in range(3)]
    rows = [dict(pid="1", question="Which is larger?", image="images/1.jpg", decoded_image=images[0],
                 choices=["3 cm", "12 cm", "5 cm"], unit=None, precision=None, answer="12 cm",
                 question_type="multi_choice", answer_type="text", metadata={"source": "x"},
                 query="Hint: answer with the option letter.\nQuestion: Which is larger?\nChoices:\n"
                       "(A) 3 cm\n(B) 12 cm\n(C) 5 cm"),
            dict(pid="2", question="How many?", image="images/2.jpg", decoded_image=images[1], choices=None,
                 unit=None, precision=None, answer="12", question_type="free_form", answer_type="integer",
                 metadata={"source": "y"}, query="Hint: integer answer.\nQuestion: How many?"),
            dict(pid="3", question="Pick", image="images/3.jpg", decoded_image=images[2],
                 choices=["yes", "no"], unit=None, precision=None, answer="no", question_type="multi_choice",
                 answer_type="text", metadata={"source": "z"},
                 query="Question: Pick\nChoices:\n(A) yes\n(B) no")]
    root = str(tmp_path / "MathVista")
    os.makedirs(os.path.join(root, "data"))
    features = datasets.Features(dict(
        pid=datasets.Value("string"), question=datasets.Value("string"), image=datasets.Value("string"),
        decoded_image=datasets.Image(), choices=datasets.Sequence(datasets.Value("string")),
        unit=datasets.Value("string"), precision=datasets.Value("float64"), answer=datasets.Value("string"),
        question_type=datasets.Value("string"), answer_type=datasets.Value("string"),
        metadata={"source": datasets.Value("string")}, query=datasets.Value("string")))
    datasets.Dataset.from_list(rows, features=features).to_parquet(
        os.path.join(root, "data", "testmini-00000-of-00001.parquet"))
    samples, _ = benchmarks.load_benchmark("mathvista_testmini", evaluate.build_parser().parse_args(
        ["--ckpt", "x", "--data_dir", root]))
    assert [s["answer"] for s in samples] == ["B", "12", "B"]
    assert samples[0]["question"].startswith("<image>Hint") and len(samples[0]["images"]) == 1


def test_eval_counts_a_row_whose_images_and_placeholders_disagree_as_wrong(tiny_model_dir, tmp_path):
    path = _eval_jsonl(tmp_path, n=4)
    lines = [json.loads(l) for l in open(path)]
    lines[2]["problem"] = "<image><image>How many squares?"                 # two marks, one image
    open(path, "w").write("".join(json.dumps(l) + "\n" for l in lines))
    evaluate.main(["--ckpt", tiny_model_dir, "--data", path, "--output_dir", str(tmp_path / "ev"),
                   "--max_new_tokens", "2"])
    s = json.load(open(tmp_path / "ev" / "summary.json"))["counting_local"]
    preds = [json.loads(l) for l in open(tmp_path / "ev" / "predictions.jsonl")]
    assert s["n"] == 4 and s["bad_rows"] == 1
    assert not preds[2]["correct"] and "2 <image> placeholders but 1 image" in preds[2]["error"]


def test_option_letters_in_latex_or_lower_case_are_graded_right():
    for answer in ("B", "(B)", "\\text{B}", "\\text{(B)}", "\\mathrm{B}", "\\textbf{B}", "b", "(b)",
                   "B. 12 cm"):
        assert rollout.grade(answer, "B"), answer
    for answer in ("\\text{C}", "c", "NONE", "\\text{NONE}", "The answer is B", "bb"):
        assert not rollout.grade(answer, "B"), answer


def test_the_smoke_script_asks_one_rank_per_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert smoke.default_ranks() == 1                         # a one-GPU machine: one rank, not two
    with pytest.raises(SystemExit, match="--nproc 2: this machine has 1 GPU.*pass --nproc 1"):
        smoke.check_ranks(2)
    smoke.check_ranks(1)
    assert "collectives between ranks are not exercised" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert smoke.default_ranks() == 8
    smoke.check_ranks(8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert smoke.default_ranks() == 2                         # CPU: 2 gloo ranks
    smoke.check_ranks(2)


def test_the_smoke_script_runs_the_7b_preset_path_and_eval_on_two_ranks(tmp_path):
    # on a GPU machine this is the first thing to run (NCCL, bf16); here 2 CPU ranks with gloo
    result = subprocess.run([sys.executable, "smoke.py", "--nproc", "2",
                             "--work_dir", str(tmp_path / "smoke")],
                            cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "smoke test passed on 2 CPU ranks" in result.stdout


# =============================================================================
# no run lost: resume after every kind of damage

def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "peak_mem_gb")} for r in rows]


@pytest.fixture(scope="session")
def unbroken_run(tiny_model_dir, tmp_path_factory):
    """4 steps with a checkpoint every 2: the reference every damaged resume must reproduce."""
    out = str(tmp_path_factory.mktemp("unbroken") / "run")
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "4"] + FAST)
    return out


def _damaged_copy(unbroken_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(unbroken_run, out)
    return out, os.path.join(out, "checkpoints")


def test_resume_falls_back_to_the_newest_complete_checkpoint(unbroken_run, tiny_model_dir, tmp_path, capsys):
    resume = ["--model", tiny_model_dir, "--max_steps", "4", "--resume"] + FAST
    damages = {  # name -> what happens to the newest checkpoint (the one `latest` names)
        "deleted": lambda ck: shutil.rmtree(os.path.join(ck, "step_000004")),
        "no_state": lambda ck: os.remove(os.path.join(ck, "step_000004", "training_state.pt")),
        "cut_state": lambda ck: os.truncate(os.path.join(ck, "step_000004", "training_state.pt"), 1000),
        "cut_weights": lambda ck: os.truncate(os.path.join(ck, "step_000004", "model.safetensors"), 5000),
    }
    for name, damage in damages.items():
        out, ck = _damaged_copy(unbroken_run, tmp_path / name)
        damage(ck)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write('{"step": 5, "acc": 0.')                       # a line cut off by a crash
        os.makedirs(os.path.join(ck, ".tmp_step_000006"))           # a save that never finished
        capsys.readouterr()
        train.main(resume + ["--out_dir", out])
        said = capsys.readouterr().out
        assert "resuming from" in said and "step_000002" in said, name
        assert _strip(read_metrics(out)) == _strip(read_metrics(unbroken_run)), name
        assert not os.path.exists(os.path.join(ck, ".tmp_step_000006"))
        assert checkpoints.checkpoint_problem(os.path.join(ck, "step_000004")) is None


def test_resume_without_any_complete_checkpoint_refuses_and_changes_nothing(unbroken_run, tiny_model_dir,
                                                                             tmp_path):
    out, ck = _damaged_copy(unbroken_run, tmp_path)
    for step in ("step_000002", "step_000004"):
        os.remove(os.path.join(ck, step, "training_state.pt"))
    before = open(os.path.join(out, "metrics.jsonl")).read()
    with pytest.raises(SystemExit, match="(?s)no complete checkpoint.*step_000004 is incomplete"
                                         ".*Nothing was changed"):
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "4",
                    "--resume"] + FAST)
    assert open(os.path.join(out, "metrics.jsonl")).read() == before
    assert sorted(os.listdir(ck)) == ["latest", "step_000002", "step_000004"]


def test_resuming_a_finished_run_says_there_is_nothing_to_do(unbroken_run, tiny_model_dir, tmp_path, capsys):
    out, _ = _damaged_copy(unbroken_run, tmp_path)
    for max_steps in ("4", "3"):
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", max_steps,
                    "--resume"] + FAST)
        assert "already complete" in capsys.readouterr().out
    assert read_metrics(out) == read_metrics(unbroken_run)


def test_save_every_0_saves_only_at_the_end(tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "3"]
               + FAST[:-4] + ["--save_every", "0"])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_000003"]


def test_a_deliberate_change_on_resume_needs_allow_changed_and_is_logged(unbroken_run, tiny_model_dir,
                                                                          tmp_path, capsys):
    out, _ = _damaged_copy(unbroken_run, tmp_path)
    common = ["--model", tiny_model_dir, "--out_dir", out, "--max_steps", "5", "--resume",
              "--temperature", "0.7"]
    with pytest.raises(SystemExit, match="--allow_changed temperature"):
        train.main(common + FAST)
    train.main(common + FAST + ["--allow_changed", "temperature"])
    assert "notice: --temperature changed from 1.0 (checkpoint) to 0.7" in capsys.readouterr().out
    assert read_metrics(out)[-1]["step"] == 5


def test_a_bad_validation_row_stops_the_run_at_start_up_or_is_skipped(tiny_model_dir, tmp_path, capsys):
    rows = counting_rows(6)
    val = write_virl_rows(str(tmp_path / "val"), rows)
    os.remove(os.path.join(tmp_path, "val", "img_3_0.png"))
    out = str(tmp_path / "run")
    flags = ["--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2", "--val_data", val] + FAST
    with pytest.raises(dataset.BadRowError, match="row 3: image 0 cannot be opened"):
        train.main(flags)
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")), "stopped before any step"
    train.main(flags + ["--skip_bad_rows", "--max_bad_fraction", "0.2"])
    assert "validation: 1 of 6 rows skipped" in capsys.readouterr().out
    assert "val_acc" in read_metrics(out)[-1]


def test_the_text_of_every_training_row_is_checked_at_start_up(tiny_model_dir, tmp_path, capsys):
    rows = counting_rows(12)
    rows[9] = dict(rows[9], problem="<image><image>How many squares?")         # two marks, one image
    path = write_virl_rows(str(tmp_path / "d"), rows)
    out = str(tmp_path / "run")
    flags = ["--model", tiny_model_dir, "--out_dir", out, "--max_steps", "1", "--train_data", path] + FAST
    with pytest.raises(dataset.BadRowError,
                       match="row 9: 2 <image> placeholders in the problem but 1 images"):
        train.main(flags)
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")), "stopped before any step"
    train.main(flags + ["--skip_bad_rows"])
    assert "training data: 1 of 12 rows have unusable text" in capsys.readouterr().out


def test_a_bad_training_row_stops_the_command_with_its_message_and_no_traceback(tiny_model_dir, tmp_path):
    rows = counting_rows(12)
    rows[9] = dict(rows[9], problem="<image><image>How many squares?")         # two marks, one image
    path = write_virl_rows(str(tmp_path / "d"), rows)
    cmd = [sys.executable, "train.py", "--model", tiny_model_dir, "--out_dir", str(tmp_path / "run"),
           "--max_steps", "1", "--train_data", path] + FAST
    done = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert "row 9: 2 <image> placeholders in the problem but 1 images" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_skipping_every_row_stops_with_the_first_bad_rows_named(tiny_model_dir, tmp_path):
    path = write_virl_rows(str(tmp_path / "d"), counting_rows(16))
    for k in range(16):                                   # the .jsonl moved away from its images
        os.remove(os.path.join(tmp_path, "d", f"img_{k}_0.png"))
    out = str(tmp_path / "run")
    # 24 bad rows: a round of the batch's 8, then (nothing kept) one of twice the batch, 16
    with pytest.raises(SystemExit,
                       match="(?s)no usable prompt.*24 bad rows.*row \\d+: image 0 cannot be opened"):
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2",
                    "--train_data", path, "--skip_bad_rows", "--max_tries", "2"] + FAST[:-2])
    assert not os.path.exists(os.path.join(out, "checkpoints")), "no untrained checkpoint"
    # a quarter bad: more than the default 10% stops the run; a higher limit lets it train
    path = write_virl_rows(str(tmp_path / "q"), counting_rows(16))
    for k in range(0, 16, 4):
        os.remove(os.path.join(tmp_path, "q", f"img_{k}_0.png"))
    with pytest.raises(SystemExit, match="bad, more than --max_bad_fraction 0.1"):
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", str(tmp_path / "r1"),
                    "--max_steps", "2", "--train_data", path, "--skip_bad_rows"] + FAST)
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", str(tmp_path / "r2"),
                "--max_steps", "2", "--train_data", path, "--skip_bad_rows", "--max_bad_fraction", "0.5"]
               + FAST)
    assert sum(r["bad_rows"] for r in read_metrics(str(tmp_path / "r2"))) > 0


def test_bad_text_is_a_bad_row_or_a_clear_file_error(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    tiny.counting_example(5, 0)["images"][0].save(folder / "a.png")
    good = b'{"problem": "<image>How many squares?", "answer": "1", "images": ["a.png"]}\n'
    path = folder / "t.jsonl"
    path.write_bytes(good + b'{"problem": "<image>How \xff many?", "answer": "2", "images": ["a.png"]}\n'
                     + b'{"problem": null, "answer": "2", "images": []}\n' + good)
    rows = dataset.Rows(dataset.load_table(str(path), "train", ("problem", "answer", "images")), str(path))
    assert rows[0]["answer"] == "1" and rows[3]["answer"] == "1"
    with pytest.raises(dataset.BadRowError, match="row 1: its text is not valid UTF-8"):
        rows[1]
    with pytest.raises(dataset.BadRowError, match="row 2: no problem text"):
        rows[2]
    bad_rows = dataset.BadRows("training data", train.parse_args(["--task", "count", "--skip_bad_rows"]))
    assert len(dataset.fetch_examples(rows, range(4), bad_rows)) == 2
    assert bad_rows.in_step == 2 and "UTF-8" in bad_rows.first[0]
    broken = folder / "broken.jsonl"
    broken.write_bytes(good + b'{"problem": "x", "answer": \n' + good)
    with pytest.raises(ValueError, match="broken.jsonl, line 2: not valid JSON"):
        dataset.load_table(str(broken), "train", ("problem", "answer", "images"))
    blank = folder / "blank.jsonl"
    blank.write_text("  \n\n ")
    with pytest.raises(ValueError, match="blank.jsonl is empty"):
        dataset.load_table(str(blank), "train", ("problem", "answer", "images"))
    empty_dir = tmp_path / "nodata"
    empty_dir.mkdir()
    (empty_dir / "README.md").write_text("# a dataset card, no data")
    with pytest.raises(ValueError, match="a folder without data files"):
        dataset.load_table(str(empty_dir), "train", ("problem", "answer", "images"))


def _start_and_wait_for_steps(cmd, out, steps):
    """Start a training command in this folder; return once metrics.jsonl has `steps` lines."""
    import time
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while (not (os.path.exists(metrics) and open(metrics).read().count("\n") >= steps)
           and time.time() < deadline):
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_at_the_next_step_and_exits_cleanly(tiny_model_dir, tmp_path, sig):
    import signal
    out = str(tmp_path / "run")
    cmd = [sys.executable, "train.py", "--model", tiny_model_dir, "--out_dir", out,
           "--max_steps", "1000"] + FAST
    proc = _start_and_wait_for_steps(cmd, out, 3)
    proc.send_signal(getattr(signal, sig))                 # mid-run, between or inside steps
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    rows = read_metrics(out)
    assert 3 <= rows[-1]["step"] < 1000
    assert f"stopped by {sig} after step {rows[-1]['step']}" in output
    latest = checkpoints.latest_checkpoint(out)
    assert latest.endswith(f"step_{rows[-1]['step']:06d}") and checkpoints.checkpoint_problem(latest) is None


def test_a_signal_during_the_warm_start_stops_before_the_first_step_and_keeps_nothing_half_done(
        tmp_path, monkeypatch, capsys):
    import signal
    out = str(tmp_path / "run")
    done = tiny.warm_start_done

    def interrupted(*args, **kwargs):                      # Ctrl-C at the warm start's first check
        os.kill(os.getpid(), signal.SIGINT)
        return done(*args, **kwargs)
    monkeypatch.setattr(tiny, "warm_start_done", interrupted)
    train.main(["--out_dir", out, "--max_steps", "3"])   # the default: the colour task's warm start
    said = capsys.readouterr().out
    assert "stopped by SIGINT before the first step: nothing was trained or saved" in said, said[-2000:]
    assert not os.path.exists(os.path.join(out, "tiny-init-warm")), "a cut warm start is never kept"
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    assert checkpoints.latest_checkpoint(out) is None


def test_sigterm_to_torchrun_saves_the_same_step_on_every_rank(tiny_model_dir, tmp_path):
    import signal
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
           "train.py", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "1000"] + FAST
    proc = _start_and_wait_for_steps(cmd, out, 3)
    # to the launcher, as a cluster does; it forwards it to the ranks
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    rows = read_metrics(out)
    assert f"stopped by SIGTERM after step {rows[-1]['step']}" in output, output[-3000:]
    latest = checkpoints.latest_checkpoint(out)
    assert latest.endswith(f"step_{rows[-1]['step']:06d}") and checkpoints.checkpoint_problem(latest) is None
    assert rows[-1]["replica_divergence"] == 0.0  # both ranks reached the same step and weights


def test_keep_last_keeps_the_newest_checkpoints_and_the_paper_preset_keeps_two(tiny_model_dir, tmp_path):
    assert train.parse_args(["--preset", "paper7b"]).keep_last == 2
    assert train.parse_args(["--preset", "paper7b", "--keep_last", "0"]).keep_last == 0    # the flag wins
    out = str(tmp_path / "run")
    train.main(["--model", tiny_model_dir, "--out_dir", out, "--max_steps", "3", "--keep_last", "2"]
               + FAST[:-6] + ["--val_every", "0", "--save_every", "1"])
    root = os.path.join(out, "checkpoints")
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_000002", "step_000003"]
    assert open(os.path.join(root, "latest")).read() == "step_000003"


def _slow_rank_script(tmp_path):
    """train.py under torchrun, where rank 1 samples 20 s late in the first round."""
    script = tmp_path / "slow.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import train\n"
        "fast = train.sample\n"
        "def slow(*args, **kwargs):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        time.sleep(20)\n"
        "    return fast(*args, **kwargs)\n"
        "train.sample = slow\n"
        "train.cli(sys.argv[1:])\n")
    return str(script)


def test_a_collective_that_times_out_stops_the_run_naming_the_phase_it_waited_in(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--dist_timeout", "0"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29529",
           _slow_rank_script(tmp_path), "--model", tiny_model_dir, "--out_dir", str(tmp_path / "run"),
           "--max_steps", "1", "--val_every", "0", "--dist_timeout", "0.1"] + FAST[:6]
    result = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode != 0
    assert "rank 0: a collective timed out after --dist_timeout 0.1 min, in the phase 'rollout, sampling " \
           "round 1'" in result.stderr, result.stderr[-3000:]


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    flags = ["--model", tiny_model_dir, "--out_dir", out] + FAST
    train.main(flags + ["--max_steps", "2"])
    ck = os.path.join(out, "checkpoints")
    before = {f: open(os.path.join(ck, "step_000002", f), "rb").read()
              for f in os.listdir(os.path.join(ck, "step_000002"))
              if os.path.isfile(os.path.join(ck, "step_000002", f))}

    def full_disk(*a, **k):                                # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit,
                       match="(?s)no space left on .*checkpoints.*step_000002 and `latest` are intact"):
        train.main(flags + ["--max_steps", "4", "--resume"])
    monkeypatch.undo()
    # and when the free space is known to be too small, before anything is written
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SystemExit, match="no space left on .*needs about"):
        train.main(flags + ["--max_steps", "4", "--resume"])
    monkeypatch.undo()
    assert sorted(os.listdir(ck)) == ["latest", "step_000002"]
    assert open(os.path.join(ck, "latest")).read() == "step_000002"
    assert all(open(os.path.join(ck, "step_000002", f), "rb").read() == data for f, data in before.items())


def test_eval_focus_builds_no_autograd_graph(tiny_model_dir, tmp_path, monkeypatch):
    grad_on = []
    score = rollout.score
    monkeypatch.setattr(rollout, "score",
                        lambda *a, **k: grad_on.append(torch.is_grad_enabled()) or score(*a, **k))
    evaluate.main(["--ckpt", tiny_model_dir, "--data", _eval_jsonl(tmp_path), "--focus",
                   "--output_dir", str(tmp_path / "ev"), "--max_new_tokens", "2"])
    assert grad_on and not any(grad_on)


def test_training_and_eval_send_the_same_single_instruction(tiny_model, tmp_path):
    _, processor = tiny_model
    papo_question = "<image>How many squares? " + rollout.INSTRUCTION          # as PAPO_eval ships it
    for question in (papo_question, "<image>How many squares?"):
        eval_text = evaluate.prompt_text(question, rollout.INSTRUCTION)
        train_text = "".join(c.get("text", "<image>") for c in
                             rollout.build_messages(question, rollout.INSTRUCTION)[0]["content"])
        assert train_text == eval_text and eval_text.count(rollout.INSTRUCTION) == 1
    # PAPO's sentence, as PAPO_eval's questions end with it (VGPO.md)
    assert rollout.INSTRUCTION == ("You first think through the reasoning process as an internal "
                                   "monologue, enclosed within <think> </think> tags. Then, provide your "
                                   "final answer enclosed within \\boxed{}.")
    assert train.parse_args(["--task", "count", "--preset", "paper7b"]).instruction == rollout.INSTRUCTION


def test_image_lookup_prefers_the_splits_own_zip_and_never_guesses(tmp_path):
    import zipfile
    red, blue = (tiny.counting_example(1, k)["images"][0] for k in range(2))
    for name, image in (("We-Math_We-Math_images.zip", red), ("MMMU_MMMU_Pro_images.zip", blue)):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("shared/0.png", smoke.png_bytes(image))       # the same member name in both
    found = benchmarks.ImageFinder(str(tmp_path), "We_Math").open("./data/images/shared/0.png")
    assert found.tobytes() == red.tobytes()
    with pytest.raises(FileNotFoundError, match="more than one zip"):
        benchmarks.ImageFinder(str(tmp_path), "hiyouga_geometry3k").open("./data/images/shared/0.png")


def test_eval_reads_the_same_columns_as_training_and_counts_undecodable_rows(tiny_model_dir, tmp_path):
    path = _eval_jsonl(tmp_path, n=4)
    raw = open(path, "rb").read().splitlines()
    raw[1] = raw[1].replace(b"How many", b"How \xff many")                  # not UTF-8
    raw[3] = json.dumps({"problem": None, "answer": "2", "images": ["3.png"]}).encode()
    open(path, "wb").write(b"\n".join(raw) + b"\n")
    evaluate.main(["--ckpt", tiny_model_dir, "--data", path, "--problem_key", "problem",
                   "--images_key", "images", "--output_dir", str(tmp_path / "ev"), "--max_new_tokens", "2"])
    s = json.load(open(tmp_path / "ev" / "summary.json"))["counting_local"]
    preds = [json.loads(l) for l in open(tmp_path / "ev" / "predictions.jsonl")]
    assert s["n"] == 4 and s["bad_rows"] == 2
    assert "UTF-8" in preds[1]["error"] and "no question text" in preds[3]["error"]


def test_local_paths_that_do_not_exist_or_are_damaged_are_named(tiny_model_dir, tmp_path, monkeypatch):
    args = train.parse_args(["--task", "count"])
    with pytest.raises(ValueError, match="/nonexistent/model: no such folder"):
        models.load_model("/nonexistent/model", args, torch.device("cpu"))
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)    # read once, at import
    with pytest.raises(ValueError,
                       match="runs/mine: cannot read it as a hub id .*no local folder of that name"):
        models.load_model("runs/mine", args, torch.device("cpu"))
    with pytest.raises(SystemExit, match="runs/mine: cannot read it as a hub id"):
        evaluate.main(["--ckpt", "runs/mine", "--bench", "counting"])
    cut = str(tmp_path / "cut")
    shutil.copytree(tiny_model_dir, cut)
    os.truncate(os.path.join(cut, "model.safetensors"), 4096)
    with pytest.raises(ValueError, match="cut/model.safetensors is truncated"):
        models.load_model(cut, args, torch.device("cpu"))


def test_image_paths_outside_the_data_folder_need_to_be_allowed(tmp_path):
    (tmp_path / "data").mkdir()
    tiny.counting_example(5, 0)["images"][0].save(tmp_path / "elsewhere.png")
    path = tmp_path / "data" / "t.jsonl"
    path.write_text("".join(json.dumps({"problem": "<image>How many?", "answer": "1", "images": [p]}) + "\n"
                            for p in ("../elsewhere.png", str(tmp_path / "elsewhere.png"))))
    table = dataset.load_table(str(path), "train", ("problem", "answer", "images"))
    rows = dataset.Rows(table, str(path))
    for k in (0, 1):
        with pytest.raises(dataset.BadRowError, match="outside the data folder.*--allow_outside_paths"):
            rows[k]
    allowed = dataset.Rows(table, str(path), allow_outside=True)
    assert allowed[0]["images"][0].size == allowed[1]["images"][0].size == (84, 84)


def test_help_shows_every_flags_actual_default(capsys):
    for module in (config, evaluate):
        with pytest.raises(SystemExit):
            module.build_parser().parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        if module is config:
            assert "(paper: 1e-6) (default: 0.0003)" in text and "(default: 100)" in text
    assert "shared" not in evaluate.__doc__


def test_a_reward_function_can_be_plugged_in(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def every_other(texts, golds):\n    return [float(k % 2) for k in range(len(texts))]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "run")
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "1",
                "--reward", "my_rewards:every_other"] + FAST)
    row = read_metrics(out)[0]
    assert row["reward"] == 0.5 and row["kept_groups"] == 8          # every group holds both rewards
    with pytest.raises(SystemExit, match="--reward my_rewards:missing: cannot load it"):
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", str(tmp_path / "r2"),
                    "--max_steps", "1", "--reward", "my_rewards:missing"] + FAST)


def test_the_learning_rate_schedule_is_logged_and_resumes_exactly(tiny_model_dir, tmp_path):
    flags = ["--model", tiny_model_dir, "--lr", "1e-3", "--warmup_steps", "2",
             "--lr_schedule", "cosine"] + FAST
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(flags + ["--out_dir", full, "--max_steps", "4"])
    want = [1e-3 * 0.5, 1e-3, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 2))]
    assert [r["lr"] for r in read_metrics(full)] == pytest.approx(want)
    train.main(flags + ["--out_dir", part, "--max_steps", "2"])
    train.main(flags + ["--out_dir", part, "--max_steps", "4", "--resume"])
    assert _strip(read_metrics(part)) == _strip(read_metrics(full))
    # constant, the paper's schedule, is the default
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", str(tmp_path / "c"),
                "--max_steps", "2", "--lr", "5e-4"] + FAST)
    assert [r["lr"] for r in read_metrics(str(tmp_path / "c"))] == [5e-4, 5e-4]


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_report_to_sends_each_steps_metrics_and_is_optional(tiny_model_dir, tmp_path, monkeypatch, kind):
    import types
    logged = []
    if kind == "wandb":
        run = types.SimpleNamespace(log=lambda row, step: logged.append((step, row)), finish=lambda: None)
        fake = types.SimpleNamespace(init=lambda **kw: run)
        monkeypatch.setitem(sys.modules, "wandb", fake)
    else:
        class Writer:
            def __init__(self, folder):
                self.rows = {}
            def add_scalar(self, name, value, step):
                self.rows.setdefault(step, {})[name] = value
            def flush(self):
                logged[:] = sorted(self.rows.items())
            def close(self):
                pass
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                            types.SimpleNamespace(SummaryWriter=Writer))
    out = str(tmp_path / "run")
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2",
                "--report_to", kind] + FAST)
    rows = read_metrics(out)
    assert [s for s, _ in logged] == [1, 2]
    assert [r["reward"] for _, r in logged] == [r["reward"] for r in rows]
    monkeypatch.setitem(sys.modules, "wandb" if kind == "wandb" else "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match=f"--report_to {kind} needs the {kind} package"):
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", str(tmp_path / "r2"),
                    "--max_steps", "1", "--report_to", kind] + FAST)


def test_focus_from_a_real_forward_uses_the_image_placeholder_states(tiny_model):
    model, processor = tiny_model
    examples = [tiny.counting_example(6, k) for k in range(3)] + [{"problem": "What is 1 + 1?", "answer": "2",
                                                                   "images": []}]
    batch, _ = rollout.encode_prompts(processor, examples, "")
    responses = torch.randint(3, 60, (4, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(7) < torch.tensor([[7], [3], [5], [4]])
    with torch.no_grad():
        _, focus = rollout.score(model, batch, responses, mask, focus=True)
        inputs = dict(batch, input_ids=torch.cat([batch["input_ids"], responses], 1),
                      attention_mask=torch.cat([batch["attention_mask"], mask.long()], 1),
                      mm_token_type_ids=torch.cat([batch["mm_token_type_ids"],
                                                   torch.zeros_like(responses)], 1))
        hidden = model.model(**inputs).last_hidden_state.float()                  # the same forward, again
    P = batch["input_ids"].shape[1]
    is_image = batch["input_ids"] == model.config.image_token_id                  # (B, P)
    for i in range(4):
        for where, must_match in ((is_image[i], True),
                                  (~is_image[i] & (batch["attention_mask"][i] > 0), False)):
            if not where.any():
                continue
            prototype = hidden[i, :P][where].mean(0)
            want = F.cosine_similarity(hidden[i, P:], prototype.expand(7, -1), dim=-1)
            close = torch.allclose(focus[i][mask[i]], want[mask[i]], atol=1e-4)
            assert close == must_match, (i, must_match)
    assert is_image[:3].any(1).all() and not is_image[3].any()
    assert (focus[3] == 0).all(), "a prompt without an image has no prototype"


def test_a_non_finite_gradient_never_reaches_the_weights_and_is_counted(tiny_model_dir):
    args = train.parse_args(["--task", "count", "--model", tiny_model_dir, "--rollout_batch", "2",
                             "--group_size", "8", "--mini_batch", "2", "--micro_batch", "8"])
    model, processor, _ = models.load_model(tiny_model_dir, args, torch.device("cpu"))
    policy = rollout.Policy(model)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    roll = fixed_rollout(processor, [0, 1])
    roll.old_logp, focus = train.score_rollouts(policy, roll, args, torch.device("cpu"))
    roll.adv, _ = train.token_advantages(roll, focus, {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = params[3].register_hook(lambda g: g * float("nan"))
    update = train.update_policy(policy, optimizer, params, roll, args, parallel.Ranks())
    hook.remove()
    assert (update["updates"], update["skipped"]) == (1, 1) and not math.isfinite(update["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    train.update_policy(policy, optimizer, params, roll, args, parallel.Ranks())     # a finite one: applied
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dynamic_sampling_keeps_only_groups_with_both_outcomes():
    acc = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1.])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 7, 7, 9, 9])
    keep = rollout.informative_groups(acc, groups)
    #          all right,  mixed,      all wrong,  mixed,      all right,  all right
    assert keep.tolist() == [False, False, True, True, False, False, True, True, False, False, False, False]
    # groups found by id, wherever their rows are
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rollout.informative_groups(acc[order], groups[order]), keep[order])


def test_each_step_writes_a_few_samples_with_their_rewards_and_advantages(tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "2"] + FAST)
    samples = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    assert sorted({s["step"] for s in samples}) == [1, 2] and len(samples) == 8
    for s in samples:
        assert s["reward"] in (0.0, 1.0) and isinstance(s["response"], str)
        assert (s["grpo_advantage"] > 0) == (s["reward"] == 1.0)      # kept groups hold both rewards
        assert s["token_advantage_mean"] * s["grpo_advantage"] >= 0   # α, ψ > 0 keep the sign


def test_scored_logprobs_are_the_next_token_probabilities_of_a_plain_forward(tiny_model):
    model, processor = tiny_model
    batch, _ = rollout.encode_prompts(processor, [tiny.counting_example(6, k) for k in range(2)], "")
    responses = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        logp, _ = rollout.score(model, batch, responses, mask, temperature=0.7)
        inputs = dict(batch, input_ids=torch.cat([batch["input_ids"], responses], 1),
                      attention_mask=torch.cat([batch["attention_mask"], mask.long()], 1),
                      mm_token_type_ids=torch.cat([batch["mm_token_type_ids"],
                                                   torch.zeros_like(responses)], 1))
        logits = model(**inputs, use_cache=False).logits.float()                 # (B, P + T, V)
    P = batch["input_ids"].shape[1]
    # the logits at position p predict token p + 1
    want = torch.log_softmax(logits[:, P - 1:-1] / 0.7, -1).gather(-1, responses[..., None])[..., 0]
    torch.testing.assert_close(logp, want, rtol=1e-4, atol=1e-4)


def test_two_draws_of_one_row_in_a_step_are_two_groups(tiny_model, tmp_path, monkeypatch):
    model, processor = tiny_model
    (tmp_path / "alternate.py").write_text("def reward(texts, golds):\n"
                                           "    return [float(k % 2) for k in range(len(texts))]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tiny.CountingTask(3, 3)                      # 3 rows, 8 prompts a step: rows repeat
    args = train.parse_args(["--task", "count", "--rollout_batch", "8", "--mini_batch", "8",
                             "--group_size", "4", "--max_tries", "1", "--reward", "alternate:reward"])
    roll, _ = train.collect_rollouts(rollout.Policy(model), processor, data, dataset.PromptStream(3, 0), args,
                                     parallel.Ranks(), dataset.BadRows("training data", args))
    ids, counts = torch.unique(roll.group_ids, return_counts=True)
    assert len(roll.reward) == 32 and len(ids) == 8 and (counts == 4).all()


def test_a_later_sampling_round_draws_the_shortfall_over_the_keep_rate_strided_over_ranks():
    assert train.round_size(512, 0, 0, 512) == 512                       # the first round: the batch
    p = 300 / 512
    assert train.round_size(212, 300, 512, 512) == math.ceil((212 + 3 * math.sqrt(212 * (1 - p))) / p) == 410
    assert train.round_size(512, 0, 512, 512) == 1024                     # nothing kept: capped at 2x
    # a rank's prompts are every world-th one from its rank on, each with its stream position
    data = tiny.CountingTask(1, 10)
    bad_rows = dataset.BadRows("d", train.parse_args([]))
    examples = dataset.fetch_examples(data, [5, 6, 7], bad_rows, 41, stride=4)
    assert [e["group"] for e in examples] == [41, 45, 49] and [e["row"] for e in examples] == [5, 6, 7]


def test_the_groups_a_round_keeps_go_to_the_ranks_holding_the_fewest():
    assert parallel.fair_shares([4, 4], [3, 1], 3) == [2, 1]
    assert parallel.fair_shares([0, 6], [5, 5], 4) == [4, 0]
    assert parallel.fair_shares([0, 0], [2, 1], 8) == [2, 1]                # fewer found than needed: all
    assert parallel.fair_shares([0, 0, 0], [0, 9, 9], 6) == [0, 3, 3]
    # any counts: exactly min(need, found) kept, none beyond what a rank found, and the totals
    # as even as the found groups allow (a rank below the top was given all it had)
    import random
    rng = random.Random(0)
    for _ in range(200):
        held = [rng.randrange(6) for _ in range(4)]
        found = [rng.randrange(6) for _ in range(4)]
        need = rng.randrange(12)
        take = parallel.fair_shares(held, found, need)
        assert sum(take) == min(need, sum(found)) and all(0 <= t <= f for t, f in zip(take, found))
        totals = [h + t for h, t in zip(held, take)]
        top = max(t for t, k in zip(totals, take) if k) if any(take) else 0
        assert all(total >= top - 1 or k == f for total, k, f in zip(totals, take, found))


def test_dynamic_sampling_keeps_exactly_the_first_informative_groups_and_samples_every_drawn_prompt(
        tiny_model, tmp_path, monkeypatch):
    model, processor = tiny_model
    # groups whose gold count is 1 or 2 get rewards 0, 1, 0, 1 (informative); 3 and 4 all 0
    (tmp_path / "by_gold.py").write_text("def reward(texts, golds):\n"
                                         "    return [float(g in ('1', '2') and k % 2) for k, g in "
                                         "enumerate(golds)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tiny.CountingTask(40, 5)
    args = train.parse_args(["--task", "count", "--rollout_batch", "6", "--mini_batch", "6",
                             "--group_size", "4", "--max_tries", "8", "--reward", "by_gold:reward"])
    stream = dataset.PromptStream(len(data), 5)
    roll, counts = train.collect_rollouts(rollout.Policy(model), processor, data, stream, args,
                                          parallel.Ranks(), dataset.BadRows("training data", args))
    informative = [p for p, i in enumerate(dataset.PromptStream(len(data), 5).take(stream.position))
                   if data[i]["answer"] in ("1", "2")]
    assert roll.group_ids[::4].tolist() == informative[:6]               # the first 6, in stream order
    assert counts["sampled_groups"] == stream.position                    # no prompt drawn and not sampled
    assert counts["tries"] >= 2 and len(roll) == 24


def test_training_moves_credit_with_vgpo_and_not_without(tiny_model_dir, tmp_path):
    # ψ and α come from the focus scores of the sampling forward: if those were lost, VGPO
    # would silently train as GRPO (ψ = α = 1)
    stats = {}
    for name, flags in (("vgpo", []), ("dapo", ["--no_vgpo"])):
        out = str(tmp_path / name)
        train.main(["--task", "count", "--model", tiny_model_dir, "--out_dir", out, "--max_steps", "1"]
                   + FAST + flags)
        stats[name] = read_metrics(out)[0]
    assert stats["vgpo"]["psi_std"] > 0.01 and stats["vgpo"]["alpha_std"] > 0.01
    assert stats["vgpo"]["focus_early"] != stats["vgpo"]["focus_late"]
    assert stats["dapo"]["psi_std"] == 0 and stats["dapo"]["alpha_std"] == 0


if __name__ == "__main__":          # the ranks of a torchrun test: python test_vgpo.py <worker> <args...>
    workers = dict(fsdp_worker=fsdp_worker, hook_free_worker=hook_free_worker,
                   one_load_worker=one_load_worker, hsdp_worker=hsdp_worker)
    workers[sys.argv[1]](*sys.argv[2:])


# =============================================================================
# the embedded default: a task that needs the image at every step, and one focus definition

def test_chain_steps_grade_each_step_of_hand_made_responses():
    tokenizer = tiny.build_tokenizer()
    gold = "r1g2b3"
    responses = ["\\boxed{r1g2b3}",          # every step right
                 "\\boxed{r1b3}",            # green skipped: wrong, the others still graded by name
                 "\\boxed{r1g1b1}",          # both late steps copy the count before them
                 "\\boxed{r2g3b1}",          # wrong everywhere, no copy
                 "no box at all"]
    assert tiny.chain_steps(responses[1]) == {"r": (1, 8), "b": (3, 10)}
    records = []
    for text in responses:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        # the focus of token t is t: each step's focus is then the position of its digit
        records.append(dict(response=text, tokens=tokens, focus=torch.arange(len(tokens), dtype=torch.float)))
    sums = tiny.chain_sums(records, [gold] * len(records), tokenizer)
    assert [sums[f"step_correct_{k}"] for k in range(3)] == [3, 1, 2]
    # late errors: r1b3's missing green, two each in r1g1b1, r2g3b1 and the unboxed text; of
    # them only r1g1b1's repeat the answer's own previous count
    assert (sums["late_errors"], sums["late_copies"]) == (7, 2)
    # digits sit at characters 8, 10, 12 of "\\boxed{r1g2b3}" (10 for r1b3's blue), one
    # token per character; the unboxed text has no step to score
    assert [sums[f"step_focused_{k}"] for k in range(3)] == [4, 3, 4]
    assert (sums["step_focus_0"], sums["step_focus_1"], sums["step_focus_2"]) == (32, 30, 46)
    metrics = tiny.chain_metrics(sums, len(records))
    assert metrics["val_step_acc"] == [0.6, 0.2, 0.4]
    assert metrics["val_step_focus"] == [8.0, 10.0, 11.5]
    assert metrics["val_late_copy_share"] == pytest.approx(2 / 7)


def test_a_blank_images_one_answer_is_scored_by_its_probability_under_the_prior():
    assert tiny.prior_probability("\\boxed{r1g1b1}", 0.8) == pytest.approx(1 / 3 * 0.8 * 0.8)
    assert tiny.prior_probability("\\boxed{r1g2b3}", 0.8) == pytest.approx(1 / 3 * 0.1 * 0.1)
    assert tiny.prior_probability("\\boxed{r2g2b1}", 0.8) == pytest.approx(1 / 3 * 0.8 * 0.1)
    assert tiny.prior_probability("\\boxed{r1b1}", 0.8) == 0                 # not a full chain
    assert tiny.prior_probability("\\boxed{r4g4b4}", 0.8) == 0               # counts are 1-3
    assert tiny.prior_probability("\\boxed{r1g2b3}", 0.0) == pytest.approx(1 / 27)
    # the probabilities of every chain add up to one, and match the generator's frequencies
    chains = [f"\\boxed{{r{r}g{g}b{b}}}" for r in (1, 2, 3) for g in (1, 2, 3) for b in (1, 2, 3)]
    assert sum(tiny.prior_probability(c, 0.8) for c in chains) == pytest.approx(1.0)
    import random
    rng = random.Random(11)
    draws = collections.Counter(tuple(tiny.colour_counts(rng, 0.8)) for _ in range(20_000))
    assert abs(draws[(1, 1, 1)] / 20_000 - tiny.prior_probability("\\boxed{r1g1b1}", 0.8)) < 0.01


def test_the_colour_tasks_prior_prompts_copy_the_count_before_and_held_out_ones_do_not():
    import random
    for copy_prior, want in ((0.8, 0.8), (0.0, 1 / 3)):
        rng = random.Random(7)
        draws = [tiny.colour_counts(rng, copy_prior) for _ in range(6000)]
        for k in (1, 2):
            same = statistics.mean(d[k] == d[k - 1] for d in draws)
            assert abs(same - want) < 0.02, (copy_prior, k, same)
        # every count stays uniform over 1-3 either way (a copy of a uniform count is uniform)
        for k in range(3):
            shares = collections.Counter(d[k] for d in draws)
            assert all(abs(shares[n] / len(draws) - 1 / 3) < 0.03 for n in (1, 2, 3)), shares
    # the training prompts carry the prior, validation and the warm start's checks do not
    args = train.parse_args([])
    assert args.copy_prior == 0.8 and train.parse_args(["--task", "count"]).copy_prior == 0.0
    data = dataset.open_data("synthetic", "train", args, seed_offset=0, size=300, copy_prior=args.copy_prior)
    held_out = dataset.open_data("synthetic", "test", args, seed_offset=10_000, size=300)
    for rows, want in ((data, 0.8), (held_out, 1 / 3)):
        answers = [rows[i]["answer"] for i in range(300)]
        same = statistics.mean(a[3] == a[1] for a in answers)               # green equals red
        assert abs(same - want) < 0.1, (want, same)
    _, checks = tiny.warm_start_sets(0, 0.8, 64)
    assert [c["answer"] for c in checks[:20]] == [tiny.colour_example(30_000, i)["answer"] for i in range(20)]
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "count", "--copy_prior", "0.5"])
    with pytest.raises(SystemExit):
        train.parse_args(["--copy_prior", "1.5"])


def test_the_warm_start_stops_at_the_first_check_whose_first_step_reaches_the_target(tiny_model_dir,
                                                                                      tmp_path):
    # the rule itself: the first step (no text predicts it), never the whole answer
    assert tiny.warm_start_done(0.8, 0.8) and not tiny.warm_start_done(0.79, 0.8)
    args = train.parse_args([])
    # a target every check meets: it stops at the first check (step 2) and records why
    out, steps, _ = tiny.warm_start(tiny_model_dir, str(tmp_path / "a"), args, master=False, batch=8,
                                    max_steps=6, target=0.0, n_checks=4)
    info = json.load(open(os.path.join(out, "warm_start.json")))
    assert steps == 2 and info["target"] == 0.0 and len(info["step_accuracy"]) == 3
    assert info["copy_prior"] == 0.8
    # a target no check meets: it runs every step
    _, steps, _ = tiny.warm_start(tiny_model_dir, str(tmp_path / "b"), args, master=False, batch=8,
                                  max_steps=4, target=1.01, n_checks=4)
    assert steps == 4


def test_the_look_tasks_targets_look_or_copy_the_count_before_at_the_share_asked():
    import random
    rng = random.Random(0)
    looks = collections.Counter()
    for index in range(3000):
        ex = tiny.look_example(5, index, look=0.3)
        scene = tiny.colour_example(5, index)
        assert ex["answer"] == scene["answer"], "the same scene and gold as the colour task"
        notes, box = ex["solution"].split("\\boxed{")
        said = [int(c) for c in box[1:-1:2]]
        truth = [int(c) for c in ex["answer"][1::2]]
        parts = notes.split()
        assert tiny.LOOK.fullmatch(parts[0][:parts[0].index("=") + 1]), "red always looks"
        for k, (name, part) in enumerate(zip("rgb", parts)):
            if tiny.LOOK.match(part):                                  # "g:47=2": its cells, then the truth
                cells = part[2:part.index("=")]
                assert len(cells) == truth[k] == said[k] and list(cells) == sorted(cells)
                looks[k] += 1
            else:                                                      # "g=2": the count before it
                assert part == f"{name}={said[k - 1]}" and said[k] == said[k - 1]
        assert tiny.chain_looks(ex["solution"]) == {n for k, n in enumerate("rgb") if k == 0 or
                                                     tiny.LOOK.match(parts[k])}
        assert ex["free"] == []
        assert rollout.grade(rollout.extract_answer(ex["solution"], False), ex["answer"]) == (said == truth)
    assert looks[0] == 3000
    for k in (1, 2):
        assert abs(looks[k] / 3000 - 0.3) < 0.03, looks
    # an all-looking target that does not teach the choice: its free characters are the late ":"s
    ex = tiny.look_example(5, 1, look=1.0, teach_choice=False)
    assert [ex["solution"][p - 1:p + 1] for p in ex["free"]] == ["g:", "b:"]
    # the warm start's mix: even rows all look and leave their choices out, odd rows look at LOOK_SHARE
    train_set, checks = tiny.warm_start_sets(0, 0.8, 400, n_checks=8, task="look")
    assert all(train_set[i]["free"] for i in range(0, 400, 2))
    odd = [tiny.chain_looks(train_set[i]["solution"]) for i in range(1, 400, 2)]
    assert not any(train_set[i]["free"] for i in range(1, 400, 2))
    assert abs(statistics.mean(len(looked) - 1 for looked in odd) / 2 - tiny.LOOK_SHARE) < 0.07
    # its prompts are drawn without the prior, as are its checks: green equals red 1 time in 3
    same = statistics.mean(train_set[i]["answer"][3] == train_set[i]["answer"][1] for i in range(400))
    assert abs(same - 1 / 3) < 0.08
    assert [c["answer"] for c in checks] == [tiny.colour_example(30_000, i)["answer"] for i in range(8)]
    # RL's training prompts carry the prior, as on the colour task; validation's do not
    args = train.parse_args(["--task", "look"])
    longest = "r:123=3 g:456=3 b:789=3 \\boxed{r3g3b3}"                       # and the EOS
    assert args.copy_prior == 0.8 and args.max_new_tokens >= len(longest) + 1
    data = dataset.open_data("synthetic", "train", args, seed_offset=0, size=300, copy_prior=args.copy_prior)
    assert isinstance(data, tiny.LookTask)
    assert abs(statistics.mean(data[i]["answer"][3] == data[i]["answer"][1] for i in range(300)) - 0.8) < 0.1
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "looking"])


def test_look_rate_look_accuracy_and_guesses_where_the_prior_misleads_on_hand_made_responses():
    gold = "r1g2b2"                       # green breaks the prior (2 after 1), blue follows it
    responses = ["r:5=1 g:38=2 b:17=2 \\boxed{r1g2b2}",     # looks at both late steps, both right
                 "r:5=1 g=1 b=1 \\boxed{r1g1b1}",           # guesses both: green wrong, misled by the prior
                 "r:5=1 g:3=1 b=1 \\boxed{r1g1b1}",         # looks at green wrongly, then copies it
                 "r:5=1 g=1 b:17=2 \\boxed{r1g1b2}",        # guesses green, looks at blue
                 "\\boxed{r1g2b2}"]                         # no notes: both late steps count as guesses
    sums = tiny.chain_sums([dict(response=t) for t in responses], [gold] * 5, None)
    assert (sums["late_steps"], sums["looks"], sums["looks_right"]) == (10, 4, 3)
    # green's truth differs from red's in every answer (5 breaks); blue's equals green's
    assert (sums["breaks"], sums["break_guesses"], sums["break_guesses_right"]) == (5, 3, 1)
    metrics = tiny.chain_metrics(sums, 5, prefix="val_", looks=True)
    assert metrics["val_look_rate"] == pytest.approx(0.4) and metrics["val_look_acc"] == pytest.approx(0.75)
    assert metrics["val_guess_acc_breaking"] == pytest.approx(1 / 3)
    assert metrics["val_step_acc"] == [1.0, 0.4, 0.6]
    assert "val_look_rate" not in tiny.chain_metrics(sums, 5)             # the colour task's log is unchanged
    empty = tiny.chain_metrics(tiny.chain_sums([], [], None), 0, looks=True)
    assert math.isnan(empty["val_look_rate"]) and math.isnan(empty["val_look_acc"])


def test_the_look_warm_start_leaves_the_free_choices_out_of_its_loss_and_stops_on_sampled_looks(
        tiny_model, tiny_model_dir, tmp_path, monkeypatch):
    model, processor = tiny_model
    args = train.parse_args(["--task", "look"])
    free = tiny.look_example(0, 3, look=1.0, teach_choice=False)
    taught = dict(free, free=[])
    model.eval()
    loss_free = tiny.supervised_loss(model, processor, [free], args.instruction)
    loss_all = tiny.supervised_loss(model, processor, [taught], args.instruction)
    # the naive reference: -log p of each target token, averaged over the tokens kept
    tokenizer = processor.tokenizer
    ids = tokenizer(free["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    responses = torch.tensor([ids])
    prompts, _ = rollout.encode_prompts(processor, [free], args.instruction)
    logp, _ = rollout.score(model, prompts, responses, torch.ones_like(responses, dtype=torch.bool))
    kept = [t for t in range(len(ids)) if t not in free["free"]]
    # (a free character is still read: the tokens after it are predicted as without the mask)
    assert loss_all.item() == pytest.approx(-logp[0].mean().item(), rel=1e-5)
    assert loss_free.item() == pytest.approx(-logp[0, kept].mean().item(), rel=1e-5)
    assert loss_free.item() != pytest.approx(loss_all.item(), rel=1e-4)
    # a padded batch of responses of unequal lengths: the mean over every real token, as each
    # response scored on its own (no free characters: the colour task's loss is this one)
    examples = [tiny.look_example(0, i, look=0.5) for i in range(4)]
    assert len({len(ex["solution"]) for ex in examples}) > 1
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([tokenizer(ex["solution"], add_special_tokens=False)["input_ids"] +
                            [tokenizer.eos_token_id]])
        prompts, _ = rollout.encode_prompts(processor, [ex], args.instruction)
        logp, _ = rollout.score(model, prompts, ids, torch.ones_like(ids, dtype=torch.bool))
        total, count = total - logp.sum().item(), count + ids.shape[1]
    batched = tiny.supervised_loss(model, processor, examples, args.instruction).item()
    assert batched == pytest.approx(total / count, rel=1e-4)
    # the stopping rule: sampled looks that are right often enough
    assert tiny.look_warm_start_done({"sampled_look_acc": tiny.LOOK_TARGET})
    assert not tiny.look_warm_start_done({"sampled_look_acc": tiny.LOOK_TARGET - 0.01})
    assert not tiny.look_warm_start_done({"sampled_look_acc": float("nan")}), "no looks: not done"
    # wired in: it checks every LOOK_EVERY steps, stops at the first check the rule accepts and
    # records its figures; a rule that never accepts runs twice the colour task's max_steps
    monkeypatch.setattr(tiny, "LOOK_EVERY", 2)
    seen = []
    monkeypatch.setattr(tiny, "look_warm_start_done", lambda checked: seen.append(checked) or len(seen) == 2)
    out, steps, _ = tiny.warm_start(tiny_model_dir, str(tmp_path / "look"), args, master=False, batch=2,
                                    max_steps=3, n_checks=2)
    info = json.load(open(os.path.join(out, "warm_start.json")))
    assert steps == 4 and info["steps"] == 4 and info["task"] == "look"
    assert json.dumps(info["checks"]) == json.dumps(seen[-1])               # nan where nothing looked
    assert 0 <= info["checks"]["sampled_look_rate"] <= 1
    monkeypatch.setattr(tiny, "look_warm_start_done", lambda checked: False)
    _, steps, _ = tiny.warm_start(tiny_model_dir, str(tmp_path / "never"), args, master=False, batch=2,
                                  max_steps=3, n_checks=2)
    assert steps == 6
    # one task's cached warm start is never another's starting policy
    with pytest.raises(SystemExit, match="holds the warm start of --task look"):
        tiny.warm_start(tiny_model_dir, out, train.parse_args([]), master=False, batch=2, max_steps=3)


def test_evals_focus_summary_carries_the_look_figures_of_a_look_run_only():
    tokenizer = tiny.build_tokenizer()
    records = []
    for text, correct in (("r:5=1 g:38=2 b=2 \\boxed{r1g2b2}", True),       # green looks, blue guesses
                          ("r:5=1 g=1 b=1 \\boxed{r1g1b1}", False)):       # both guess
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        records.append(dict(response=text, correct=correct, image_ok=True, gold="r1g2b2",
                            focus_thirds=[0.1, 0.2, 0.3], _tokens=dict(ids=ids, focus=[0.5] * len(ids),
                                                                      dependence=[0.1] * len(ids))))
    looked = evaluate.summarise(records, True, tokenizer, looks=True)
    assert looked["look_rate"] == pytest.approx(1 / 4) and looked["look_acc"] == pytest.approx(1.0)
    assert looked["guess_acc_breaking"] == 0.0 and looked["step_acc"] == [1.0, 0.5, 0.5]
    plain = evaluate.summarise(records, True, tokenizer)
    assert "look_rate" not in plain and plain["step_acc"] == looked["step_acc"]


def test_the_shuffled_focus_control_keeps_each_responses_values_and_moves_them():
    gen = torch.Generator().manual_seed(0)
    focus = torch.rand(6, 9, generator=gen)
    mask = torch.arange(9) < torch.tensor([9, 5, 1, 7, 9, 3]).unsqueeze(1)
    torch.manual_seed(1)
    shuffled = train.shuffle_within_responses(focus, mask)
    for i in range(6):
        assert sorted(shuffled[i][mask[i]].tolist()) == sorted(focus[i][mask[i]].tolist())
    assert torch.equal(shuffled[~mask], focus[~mask]), "padding is untouched"
    assert not torch.equal(shuffled[mask], focus[mask]), "the values moved"
    # in training it reaches VGPO: the same rollout gives other ψ, and only with the flag
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 0])
    samples = _Sized(types.SimpleNamespace(reward=rewards, group_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
                                           mask=mask, images_per_row=torch.ones(6, dtype=torch.long)))
    switches = train.vgpo_switches(train.parse_args([]))
    plain, stats = train.token_advantages(samples, focus, switches)
    again, _ = train.token_advantages(samples, focus, switches)
    moved, moved_stats = train.token_advantages(samples, focus, switches, shuffle_focus=True)
    assert torch.equal(plain, again) and not torch.equal(plain, moved)
    assert torch.equal(stats["grpo"], moved_stats["grpo"]), "the GRPO advantage is kept"
    with pytest.raises(SystemExit):
        train.parse_args(["--no_vgpo", "--control_shuffle_focus"])


class _Sized(types.SimpleNamespace):
    """A namespace with a length, standing in for a Rollout of len(reward) rows."""

    def __init__(self, inner):
        super().__init__(**vars(inner))

    def __len__(self):
        return len(self.reward)


def test_the_mean_phi_control_removes_alpha_s_growth_with_length():
    # the same focus pattern per token, responses of 4 and 8 tokens in one group: with Eq. 9's
    # sum the longer ones get the larger α; with the mean their α is the same
    pattern = torch.tensor([0.0, 1.0] * 4)
    focus = pattern.repeat(4, 1)                                             # (4, 8)
    mask = torch.arange(8) < torch.tensor([4, 8, 4, 8]).unsqueeze(1)
    rewards, groups = torch.tensor([1.0, 1, 0, 0]), torch.zeros(4, dtype=torch.long)
    off = dict(compensation=False, gate=False)
    _, summed = vgpo.vgpo_advantages(rewards, groups, focus, mask, **off)
    _, mean = vgpo.vgpo_advantages(rewards, groups, focus, mask, phi_mean=True, **off)
    assert summed["alpha"][1] > summed["alpha"][0] and summed["alpha"][3] > summed["alpha"][2]
    assert torch.allclose(mean["alpha"], mean["alpha"][0].expand(4))
    assert torch.equal(summed["psi"], mean["psi"]), "ψ is untouched"
    # equal lengths: α is min-max normalised in the group, so a mean and a sum agree
    equal = torch.ones(4, 8, dtype=torch.bool)
    noisy = torch.rand(4, 8, generator=torch.Generator().manual_seed(3))
    a = vgpo.vgpo_advantages(rewards, groups, noisy, equal)[1]["alpha"]
    b = vgpo.vgpo_advantages(rewards, groups, noisy, equal, phi_mean=True)[1]["alpha"]
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(SystemExit):
        train.parse_args(["--no_vgpo", "--control_phi_mean"])
    with pytest.raises(SystemExit):
        train.parse_args(["--no-inter", "--control_phi_mean"])


def test_image_dependence_is_zero_for_the_same_image_and_positive_when_a_prediction_needs_it(tiny_model):
    model, processor = tiny_model
    examples = [tiny.colour_example(5, i) for i in range(3)]
    batch, _ = rollout.encode_prompts(processor, examples, "")
    blank = [dict(ex, images=[tiny.colour_example(5, i, blank=True)["images"][0]])
             for i, ex in enumerate(examples)]
    blank_batch, _ = rollout.encode_prompts(processor, blank, "")
    responses = torch.tensor([processor.tokenizer(ex["solution"])["input_ids"] for ex in examples])  # (3, 14)
    mask = torch.ones_like(responses, dtype=torch.bool)
    mask[2, 9:] = False                                       # a shorter response: padding scores 0
    same = rollout.image_dependence(model, batch, batch, responses, mask)
    assert same.shape == responses.shape and same.abs().max() < 1e-6
    kl = rollout.image_dependence(model, batch, blank_batch, responses, mask)
    assert (kl[mask] > 1e-7).all() and (kl[~mask] == 0).all()
    # it is the KL of the two next-token distributions, token by token
    def log_probs(prompts):
        hidden = rollout.last_states(model, prompts, responses, mask)[:, prompts["input_ids"].shape[1] - 1:-1]
        return torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
    p, q = log_probs(batch), log_probs(blank_batch)
    want = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1) * mask
    torch.testing.assert_close(kl, want, atol=1e-5, rtol=1e-4)


def test_rank_correlation_is_spearmans_with_average_ranks_for_ties():
    assert rollout.rank_correlation(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 30, 20, 40])) \
        == pytest.approx(0.8)
    assert rollout.rank_correlation(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1)
    # ties: ranks [1.5, 1.5, 3, 4] against [1, 2, 3, 4]
    x, y = torch.tensor([5.0, 5, 6, 7]), torch.tensor([1.0, 2, 3, 4])
    rx, ry = torch.tensor([1.5, 1.5, 3, 4]), torch.tensor([1.0, 2, 3, 4])
    want = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    assert rollout.rank_correlation(x, y) == pytest.approx(want)
    assert math.isnan(rollout.rank_correlation(torch.tensor([1.0]), torch.tensor([2.0])))


def test_every_square_stays_inside_its_own_cell():
    # one square per vision token (a 28x28 cell): a square that spills a pixel row or column
    # into the next cell puts a sliver of its colour into another token
    background = (20, 20, 20)
    for k in range(60):
        for example in (tiny.colour_example(4, k), tiny.counting_example(4, k)):
            answer = example["answer"]
            squares = sum(int(c) for c in answer[1::2]) if answer[0] == "r" else int(answer)
            pixels = example["images"][0].load()
            cells = {(x // tiny.CELL, y // tiny.CELL) for x in range(84) for y in range(84)
                     if pixels[x, y] != background}
            assert len(cells) == squares, (k, answer, sorted(cells))


def test_the_colour_task_needs_the_image_at_every_step_and_boxes_an_unambiguous_code():
    processor_tokenizer = tiny.build_tokenizer()
    for k in range(50):
        ex = tiny.colour_example(3, k)
        assert ex == {**tiny.colour_example(3, k), "images": ex["images"]}        # a pure function
        assert ex["images"][0].tobytes() == tiny.colour_example(3, k)["images"][0].tobytes()
        counts = [int(c) for c in ex["answer"][1::2]]
        assert ex["answer"] == f"r{counts[0]}g{counts[1]}b{counts[2]}" and all(1 <= c <= 3 for c in counts)
        assert ex["solution"] == f"\\boxed{{{ex['answer']}}}"
        # the steps are the graded answer: a wrong last step is a wrong answer
        wrong = ex["answer"][:-1] + str(counts[2] % 3 + 1)
        assert (rollout.accuracy_rewards([ex["solution"], f"\\boxed{{{wrong}}}"], [ex["answer"]] * 2)
                == [1.0, 0.0])
        assert len(processor_tokenizer(ex["solution"])["input_ids"]) >= 12     # a chain, not a digit
        # each count is the number of squares of that colour in the image
        pixels = ex["images"][0].load()
        for colour, n in zip(tiny.RGB, counts):
            area = collections.Counter((x // tiny.CELL, y // tiny.CELL) for x in range(84) for y in range(84)
                                       if pixels[x, y] == colour)
            assert sum(a >= 20 * 20 for a in area.values()) == n                  # squares of 20-26 pixels
        blank = tiny.colour_example(3, k, blank=True)
        assert blank["answer"] == ex["answer"] and len(blank["images"][0].getcolors()) == 1


def test_training_log_and_eval_share_one_definition_of_early_and_late_focus():
    gen = torch.Generator().manual_seed(0)
    focus = torch.rand(4, 7, generator=gen)
    lengths = [7, 2, 4, 1]
    mask = torch.arange(7) < torch.tensor(lengths).unsqueeze(1)
    # naive: x = t / (T - 1); early x < 1/3, late x >= 2/3; a mean per response, then over responses
    per_response = []
    for i, T in enumerate(lengths):
        x = [t / max(T - 1, 1) for t in range(T)]
        early = [float(focus[i, t]) for t in range(T) if x[t] < 1 / 3]
        late = [float(focus[i, t]) for t in range(T) if x[t] >= 2 / 3]
        per_response.append((statistics.mean(early) if early else None,
                             statistics.mean(late) if late else None))
    profile = rollout.focus_profile(focus, mask)
    for (early, late), row in zip(per_response, profile.tolist()):
        assert (early is None and math.isnan(row[0])) or early == pytest.approx(row[0])
        assert (late is None and math.isnan(row[2])) or late == pytest.approx(row[2])
    stats = dict(psi=mask.float(), alpha=torch.ones(4), gate=mask)
    logged = checkpoints.vgpo_stats(stats, mask, focus, parallel.Ranks())
    assert logged["focus_early"] == pytest.approx(statistics.mean(e for e, _ in per_response
                                                                  if e is not None))
    assert logged["focus_late"] == pytest.approx(statistics.mean(l for _, l in per_response
                                                                 if l is not None))


# -----------------------------------------------------------------------------
# the vision side, made cheaper without changing a number (issue: GPU speed)

def _fresh_tiny(tiny_model_dir):
    """A model of its own, so that rewiring its vision side cannot leak into other tests."""
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="sdpa")


def _mixed_images_batch(processor, rows):
    """Prompts with images of three sizes (so windows of unequal length), one with two
    images, repeated as `rows` the way a rollout repeats each prompt G times."""
    examples = []
    for k, (side, n_images) in enumerate([(56, 1), (84, 2), (112, 1)]):
        images = [tiny.counting_example(8, 10 * k + j)["images"][0].resize((side, side))
                  for j in range(n_images)]
        examples.append({"problem": "<image>" * n_images + "How many?", "answer": "1", "images": images})
    batch, images_per_row = rollout.encode_prompts(processor, examples, "")
    return rollout.take_rows(batch, images_per_row, torch.tensor(rows))


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_vision_windows_in_one_attention_call_give_the_per_window_loops_numbers(tiny_model, tiny_model_dir,
                                                                                 monkeypatch):
    _, processor = tiny_model
    batch, _ = _mixed_images_batch(processor, [0, 1, 2])
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    outputs, grads, calls = [], [], []
    for batched in (False, True):
        model = _fresh_tiny(tiny_model_dir)
        if batched:
            assert models.vision_windows_in_one_call(model) == model.config.vision_config.depth
        sdpa = _count_calls(monkeypatch, torch.nn.functional, "scaled_dot_product_attention")
        out = model.model.visual(pixels, grid_thw=grid).pooler_output                      # (tokens, D)
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.model.visual.parameters()]))
        calls.append(len(sdpa))
        monkeypatch.undo()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    # the loop: one call per window of each image in windowed blocks and one per image in
    # full blocks; batched: one call per block
    windows, images = calls[0], grid.shape[0]
    assert calls[1] == model.config.vision_config.depth
    assert windows > images * model.config.vision_config.depth


def test_each_distinct_image_is_encoded_once_with_the_same_logprobs_focus_and_gradients(tiny_model,
                                                                                         tiny_model_dir):
    _, processor = tiny_model
    rows = [0, 0, 0, 1, 1, 1, 2, 2]                     # G copies of each prompt; prompt 1 has two images
    batch, _ = _mixed_images_batch(processor, rows)
    responses = torch.tensor([[5, 6, 7, 8]] * len(rows))
    mask = torch.ones(len(rows), 4, dtype=torch.bool)
    results, seen = [], []
    for once in (False, True):
        model = _fresh_tiny(tiny_model_dir)
        if once:
            models.encode_images_once(model)
        patches = []
        hook = model.model.visual.register_forward_pre_hook(lambda m, a: patches.append(a[0].shape[0]))
        logp, focus = rollout.score(model, batch, responses, mask, focus=True)
        logp.sum().backward()
        greedy, _, _ = rollout.generate(model, processor, batch, max_new_tokens=4, temperature=0)
        hook.remove()
        results.append((logp.detach(), focus, torch.cat([p.grad.flatten() for p in model.parameters()
                                                         if p.grad is not None]), greedy))
        seen.append(patches)
    for plain, once in zip(results[0], results[1]):
        torch.testing.assert_close(once, plain, rtol=1e-4, atol=1e-5)
    # 8 rows hold 11 images (prompt 1's two images, three times) but only 4 distinct ones
    all_patches = int(batch["image_grid_thw"].prod(1).sum())
    distinct = int(batch["image_grid_thw"][[0, 3, 4, 9]].prod(1).sum())
    assert seen[0] == [all_patches, all_patches] and seen[1] == [distinct, distinct]


def test_the_bf16_sampling_copy_follows_the_policy_and_samples_valid_responses(tiny_model_dir):
    args = train.parse_args(["--task", "count", "--sample_dtype", "bfloat16"])
    model, processor, _ = models.load_model(tiny_model_dir, args, torch.device("cpu"))
    policy = rollout.Policy(model)
    copy = parallel.sampling_copy(policy, args)
    # a step of training moves the fp32 weights; the copy is refreshed from them at the next rollout
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    sampler = parallel.sampling_weights(copy, policy)
    pairs = list(zip(sampler.model.parameters(), model.parameters()))
    assert len(pairs) == len(list(model.parameters())) > 0
    for mine, theirs in pairs:
        assert mine.dtype == torch.bfloat16 and theirs.dtype == torch.float32 and not mine.requires_grad
        assert torch.equal(mine, theirs.to(torch.bfloat16))
    # the copy samples with the rewired vision side of its own weights, and valid responses
    assert sampler.model.model.get_image_features.__closure__ is not None
    batch, images_per_row = rollout.encode_prompts(processor,
                                                   [tiny.counting_example(3, i) for i in range(2)], "")
    batch, _ = rollout.take_rows(batch, images_per_row, torch.tensor([0, 0, 1, 1]))
    responses, mask, _ = sampler.generate(processor, batch, max_new_tokens=4)
    assert responses.shape[0] == 4 and mask[:, 0].all()
    # float32 (the CPU default) samples with the policy itself: no copy
    assert parallel.sampling_copy(policy, train.parse_args(["--task", "count"])) is policy


def test_a_run_records_the_weights_it_sampled_with(tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--model", tiny_model_dir, "--out_dir", out, "--max_steps", "1", "--sample_dtype", "bfloat16"]
               + FAST)
    with open(os.path.join(out, "checkpoints", "step_000001", "vgpo_config.json")) as f:
        assert json.load(f)["sample_dtype"] == "bfloat16"
    assert math.isfinite(read_metrics(out)[0]["loss"])


def test_a_static_kv_cache_samples_the_same_responses_as_the_dynamic_one(tiny_model):
    model, processor = tiny_model
    batch, images_per_row = rollout.encode_prompts(processor,
                                                   [tiny.colour_example(1, i) for i in range(3)], "")
    batch, _ = rollout.take_rows(batch, images_per_row, torch.tensor([0, 0, 1, 1, 2, 2]))
    sampled = []
    for cache in ("dynamic", "static"):
        torch.manual_seed(0)
        sampled.append(rollout.generate(model, processor, batch, max_new_tokens=6, temperature=1.0,
                                        cache=cache))
    for dynamic, static in zip(*sampled):
        assert torch.equal(dynamic, static)
    assert config.parse_args(["--decode_cache", "static"]).decode_cache == "static"


def test_each_distinct_image_is_encoded_once_in_qwen3_vl_too():
    # Qwen3-VL hands the language model per-image "deepstack" features from inner vision
    # blocks as well; each image's copy must get them too. A random tiny Qwen3-VL, built here.
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           deepstack_visual_indexes=[0, 1], num_position_embeddings=64),
        image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
    gen = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 4], [1, 4, 6]])                          # two images, 16 and 24 patches
    images = [torch.randn(int(g.prod()), 3 * 2 * 16 * 16, generator=gen) for g in grid]
    order = [0, 0, 1, 1]                                                 # each prompt twice
    rows = [[152] + [150] * (int(grid[i].prod()) // 4) + [153, 5, 6, 7] for i in order]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    inputs = dict(input_ids=ids,
                  attention_mask=(torch.arange(width)
                                  >= width - torch.tensor([len(r) for r in rows]).unsqueeze(1)).long(),
                  pixel_values=torch.cat([images[i] for i in order]), image_grid_thw=grid[order],
                  mm_token_type_ids=(ids == 150).long())
    logits, patches = [], []
    for once in (False, True):
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(config).eval()
        assert not once or models.encode_images_once(model)
        hook = model.model.visual.register_forward_pre_hook(lambda m, a: patches.append(a[0].shape[0]))
        with torch.no_grad():
            logits.append(model(**inputs).logits)
        hook.remove()
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    assert patches == [80, 40]


def test_rope_positions_of_a_repeated_row_are_computed_once_and_equal_transformers(tiny_model_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    square, wide, tall = (tiny.counting_example(5, 0)["images"][0].resize(size) for size in
                          ((84, 84), (112, 56), (56, 112)))
    ask = lambda images, text="How many?": {"problem": "<image>" * len(images) + text, "answer": "1",
                                            "images": images}
    # a rollout's repeats, two images of one grid's token count but transposed (same token ids,
    # other positions), a text-only row, a two-image row, and rows padded on the left
    examples = ([ask([square])] * 3 + [ask([wide]), ask([tall]), ask([tall])]
                + [ask([], "What is 2 + 1?")] * 2 + [ask([square, wide])] * 2
                + [ask([square], "How many squares are there?")])
    batch, _ = rollout.encode_prompts(processor, examples, "")
    inner = model.model
    args = dict(image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
                mm_token_type_ids=batch["mm_token_type_ids"])
    want = inner.get_rope_index(batch["input_ids"], **args)
    rows = []
    original = inner.get_rope_index
    inner.get_rope_index = lambda input_ids, **kw: rows.append(len(input_ids)) or original(input_ids, **kw)
    assert models.rope_index_once(model)
    got = inner.get_rope_index(batch["input_ids"], **args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert rows == [6], "each run of equal rows once: 5 of the 11 rows repeat the row before"


def test_a_groups_samples_share_one_prefill_and_equal_sampling_the_repeated_rows(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    square, wide = (tiny.counting_example(5, 0)["images"][0].resize(size) for size in ((84, 84), (112, 56)))
    ask = lambda images, text="How many?": {"problem": "<image>" * len(images) + text, "answer": "1",
                                            "images": images}
    # prompts of other lengths (left padding), a text-only one and a two-image one
    examples = [ask([square]), ask([wide], "How many squares are there in this picture?"),
                ask([], "What is 2 + 1?"), ask([square, wide]), ask([wide])]
    batch, images_per_row = rollout.encode_prompts(processor, examples, "")
    repeats = torch.tensor([3, 2, 2, 1, 2])
    rows = torch.arange(5).repeat_interleave(repeats)
    repeated, _ = rollout.take_rows(batch, images_per_row, rows)
    prefill_rows = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_rows.append(kwargs["inputs_embeds"].shape), with_kwargs=True)
    assert decode.shares_prefill(model.config) and not decode.shares_prefill(model.config, "static")
    lengths = []
    for temperature in (1.0, 0.0):
        torch.manual_seed(0)
        want = rollout.generate(model, processor, repeated, max_new_tokens=40, temperature=temperature)
        assert prefill_rows[0][0] == 10
        prefill_rows.clear()
        torch.manual_seed(0)
        got = rollout.generate(model, processor, batch, max_new_tokens=40, temperature=temperature,
                               repeats=repeats)
        assert prefill_rows[0][0] == 5, "one prefill row for each distinct prompt"
        assert prefill_rows[1][:2] == (10, 1), "then every sample from the last prompt token on"
        prefill_rows.clear()
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        lengths.append(want[1].sum(1))
    assert lengths[0].unique().numel() > 1, "one sample ends early: a real test of the masks"
    # the logits, not only the tokens (the random model repeats one token whatever they are):
    # a shared prefill must give every step the logits of the repeated rows' plain call, for
    # prompts of very different lengths (left padding), with and without images
    long_text = "Count the squares, then the circles, then add both counts and write the sum. " * 3
    for prompts in ([ask([], long_text), ask([], "Hi?")], [ask([wide], long_text), ask([], "Hi?")]):
        some, images = rollout.encode_prompts(processor, prompts, "")
        counts = torch.tensor([2, 1])
        steps = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                     pad_token_id=processor.tokenizer.pad_token_id)
        plain = model.generate(**rollout.take_rows(some, images, torch.tensor([0, 0, 1]))[0], **steps)
        rows, kv = decode.prefill_once(model, some, counts)
        shared = model.generate(**rows, past_key_values=kv, **steps)
        for a, b in zip(shared.logits, plain.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # prompts without any image at all: plain positions
    text, no_images = rollout.encode_prompts(processor, [ask([], "What is 2 + 1?"), ask([], "Hi?")], "")
    torch.manual_seed(1)
    want = rollout.generate(model, processor, rollout.take_rows(text, no_images, torch.tensor([0, 0, 1]))[0],
                            max_new_tokens=12)
    torch.manual_seed(1)
    got = rollout.generate(model, processor, text, max_new_tokens=12, repeats=torch.tensor([2, 1]))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_decoding_in_segments_drops_finished_rows_and_gives_one_calls_tokens(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    batch, _ = rollout.encode_prompts(processor, [tiny.counting_example(4, k) for k in range(8)], "")
    # greedy with a repetition penalty, stopping on 2 frequent ids as well: the random model's
    # rows then end at many different lengths, one never (measured: 2 to 16, and 30)
    stops = [processor.tokenizer.eos_token_id, 42, 46]
    settings = dict(eos_token_id=stops, pad_token_id=processor.tokenizer.pad_token_id, do_sample=False,
                    repetition_penalty=3.0)
    plain = model.generate(**batch, max_new_tokens=30, **settings)[:, batch["input_ids"].shape[1]:]
    rows = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    for segment in (3, 7, 30):
        rows.clear()
        got = decode.in_segments(model, batch, None, 30, segment, settings)
        assert torch.equal(got, plain), segment
        lengths, _ = rollout.response_mask_from_eos(got, stops)
        lengths = lengths.sum(dim=1)
        # each forward writes one token a row: the rows it ran are what row_steps counts
        assert sum(rows) == decode.row_steps(lengths, segment)
    assert lengths.unique().numel() >= 4 and lengths.max() == 30
    # a shared prefill, then segments, on prompts of other lengths (left padding), one of them
    # without an image: the tokens of one plain call on the repeated rows
    square = tiny.counting_example(5, 0)["images"][0]
    mixed = [{"problem": "<image>How many?", "answer": "1", "images": [square]},
             {"problem": "What is two plus one, written as a number?", "answer": "3", "images": []},
             {"problem": "<image>How many squares are in this picture, all told?", "answer": "1",
              "images": [square.resize((112, 56))]}]
    some, images = rollout.encode_prompts(processor, mixed, "")
    repeats = torch.tensor([3, 1, 2])
    repeated, _ = rollout.take_rows(some, images, torch.arange(3).repeat_interleave(repeats))
    want = model.generate(**repeated, max_new_tokens=30, **settings)[:, repeated["input_ids"].shape[1]:]
    for segment in (3, 7):
        got = decode.generate(model, some, 30, settings, repeats=repeats, segment=segment)
        assert torch.equal(got, want), segment
    assert decode.row_steps(lengths, 3) < len(lengths) * 30, "finished rows were dropped"
    assert decode.row_steps([5, 300, 2048], 256) == 2816 and decode.row_steps([5, 300, 2048], 0) == 6144
    assert train.parse_args([]).decode_segment == decode.SEGMENT == 256
    with pytest.raises(SystemExit):
        train.parse_args(["--decode_segment", "-1"])
    # sampling through rollout.generate: in one segment, one plain call's draws; in
    # segments, each row ends at its first stop id and is padded after it
    model.generation_config.eos_token_id = stops
    eos = rollout.eos_ids(model, processor)
    torch.manual_seed(0)
    want = model.generate(**batch, max_new_tokens=30, eos_token_id=eos, pad_token_id=settings["pad_token_id"],
                          suppress_tokens=rollout.suppressed_ids(model, processor),
                          **rollout.sampling_settings(1.0, 1.0))[:, batch["input_ids"].shape[1]:]
    torch.manual_seed(0)
    got, _, _ = rollout.generate(model, processor, batch, max_new_tokens=30, temperature=1.0, segment=30)
    assert torch.equal(got, want)
    got, mask, truncated = rollout.generate(model, processor, batch, max_new_tokens=30, temperature=1.0,
                                            segment=4)
    assert ((torch.isin(got, torch.tensor(eos)) & mask).sum(dim=1) == (~truncated).long()).all()
    assert (got[~mask] == settings["pad_token_id"]).all() and mask.sum(dim=1).unique().numel() > 2


def test_distinct_images_finds_copies_by_exact_comparison():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4, 6, generator=gen) for _ in range(3))
    nearly_a = a.clone()
    nearly_a[3, 5] += 1e-6                                               # one value differs: not a copy
    grid = torch.tensor([[1, 2, 2]] * 6 + [[1, 1, 4]])                   # the last has another grid
    images = [a, a, b, a, b, nearly_a, a]
    first = models.distinct_images(torch.cat(images), grid)
    # the docstring's example, then a near-copy (its own image) and the same values under
    # another grid (a different image)
    assert first.tolist() == [0, 0, 2, 0, 2, 5, 6]


def naive_distinct_images(images, grids, lookback=4):
    """The first occurrence of each image, one pair of whole images at a time: the nearest of
    the `lookback` images before it that is equal (same grid, same values), then that one's."""
    first = []
    for i, (image, grid) in enumerate(zip(images, grids)):
        match = next((i - j for j in range(1, min(lookback, i) + 1)
                      if grids[i - j] == grid and torch.equal(images[i - j], image)), None)
        first.append(i if match is None else first[match])
    return first


def test_distinct_images_matches_a_pairwise_loop_on_rollout_batches():
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        # a rollout: prompts of 1 or 2 images repeated G times; some images reused across prompts;
        # from trial 10 on all of one size (distinct_images' shifted comparison)
        pool = [torch.randn(4 if k % 3 or trial >= 10 else 2, 6, generator=gen) for k in range(5)]
        pool.append(pool[1].clone())
        pool[-1][-1, -1] += 1e-6                                         # a near-copy: its own image
        grid_of = lambda x: [1, 2, 2] if len(x) == 4 else [1, 1, 2]
        images = []
        for _ in range(3):
            picks = torch.randint(0, 6, (1 + trial % 2,), generator=gen).tolist()
            images += [pool[k] for k in picks] * (2 + trial % 3)
        grids = [grid_of(x) for x in images]
        got = models.distinct_images(torch.cat(images), torch.tensor(grids)).tolist()
        assert got == naive_distinct_images(images, grids), trial


def test_a_checkpoint_written_before_task_and_sample_dtype_existed_resumes_as_it_ran(tiny_model_dir,
                                                                                      tmp_path):
    out = str(tmp_path / "run")
    common = ["--model", tiny_model_dir, "--out_dir", out] + FAST            # FAST holds --task count
    train.main(common + ["--max_steps", "1"])
    # an older vgpo_config.json: neither key was written then (it ran the counting task,
    # sampling with the fp32 policy)
    path = os.path.join(out, "checkpoints", "step_000001", "vgpo_config.json")
    with open(path) as f:
        saved = json.load(f)
    del saved["task"], saved["sample_dtype"]
    with open(path, "w") as f:
        json.dump(saved, f)
    args = config.parse_args(common + ["--max_steps", "2", "--resume"])
    args.sample_dtype = "float32"                                           # what auto resolves to on a CPU
    config.check_same_run(saved, args, path)                                # the same run: accepted
    args.task = "colour"                                                    # today's default task is not
    with pytest.raises(SystemExit, match="different run(.|\n)*--task: checkpoint 'count'"):
        config.check_same_run(saved, args, path)


def test_vision_windows_in_one_call_on_qwen25_vl_7bs_real_window_layout():
    # the 7B's vision config (window 112 px, patch 14, merge 2, 32 blocks with full
    # attention at 7, 15, 23, 31), only narrower; a 448x448 image (16 equal windows of 64
    # patches) and a 476x336 one (34x24 patches: windows of unequal size at the edges)
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    real = qwen25_vl_7b_config().vision_config.to_dict()
    vision_config = type(qwen25_vl_7b_config().vision_config)(**dict(real, hidden_size=32,
                                                                     intermediate_size=64, num_heads=2,
                                                                     out_hidden_size=64))
    assert (vision_config.window_size, vision_config.patch_size, vision_config.depth) == (112, 14, 32)
    vision_config._attn_implementation = "sdpa"
    grid = torch.tensor([[1, 32, 32], [1, 34, 24]])
    pixels = torch.randn(int(grid.prod(1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    outputs = []
    for batched in (False, True):
        torch.manual_seed(0)
        tower = Qwen2_5_VisionTransformerPretrainedModel(vision_config).eval()
        n = models.vision_windows_in_one_call(tower) if batched else 0
        with torch.no_grad():
            outputs.append(tower(pixels, grid_thw=grid).pooler_output)
    assert n == 32
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
