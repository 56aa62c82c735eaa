"""
The mathematics of VGPO, Visually-Guided Policy Optimization
(Wang et al., "Visually-Guided Policy Optimization for Multimodal Reasoning",
arXiv 2604.09349, ACL 2026).

VGPO is GRPO/DAPO with one change: the single sequence-level advantage of a response
is re-weighted token by token, by how much each token "looks at" the image. Tokens whose
last-layer state points towards the image get more credit (intra-trajectory, Eq. 7-8),
responses that keep looking at the image get more credit than their siblings
(inter-trajectory, Eq. 9-11), and looking at the image late in a long chain of thought,
where models tend to forget it, is encouraged (compensation Eq. 5, gate Eq. 6).

    Step 0  grpo_advantages      Â_i = (r_i - mean) / (std + 1e-6)     group baseline
    Step 1  visual_focus         s_{i,t} = cos(h_{i,t}, v_i)            focus score
            (vgpo_advantages)    w = min-max of s over the group
    Step 2  visual_compensation  c_{i,t} = β (x - s0) / (1 - s0)        Eq. 5
    Step 3  visual_gate          G_{i,t} = 1 on the top-κ tail tokens   Eq. 6
    Step 4  intra_weights        ψ_{i,t} = clamp(1 + ŵ - mean ŵ, .1, 2) Eq. 7-8
    Step 5  inter_weights        α_i = clamp(1 + φ̂ - mean φ̂, .9, 2)     Eq. 9-11
    Step 6  vgpo_advantages      A_{i,t} = Â_i · α_i · ψ_{i,t}
    Loss    policy_loss          DAPO clip-higher + dual-clip, token mean over the
                                 global mini-batch; kl_penalty for an optional KL term

How this implementation departs from the paper's public code, and why:
 1. The focus scores are min-max normalised over the tokens of one *group* (the G
    responses of one prompt). The public code normalises over whatever micro-batch it is
    handed, so its advantages change with the micro-batch size.
 2. A group is found by prompt id, never by position. The public code takes
    "consecutive rollout_n rows of the micro-batch" as a group; with a micro-batch of 4
    and n = 8 it normalises over half-groups. Here rows of a group may sit anywhere.
 3. Every factor is computed once per rollout batch, without gradient, in float32, from
    the policy that sampled the responses, so it cannot depend on how the batch is later
    split into micro-batches or ranks.
 4. A prompt without an image gets neutral factors (ψ = 1, α = 1): plain GRPO for it.
 5. Bad input (mismatched shapes, a group of one, NaN rewards, an empty batch) raises a
    ValueError that names the argument instead of producing a silent NaN.

Shapes: N responses, T response positions (valid tokens left-aligned, padding after),
P prompt positions, D hidden size. Everything here is vectorised: no Python loop over
tokens or samples, and no host-device synchronisation in the computation itself (the
input checks at the top of each function do synchronise once, by design).
"""

import math

import torch

SCHEDULES = ("linear", "exp", "step")


# -----------------------------------------------------------------------------
# input checks: fail early, name the argument, never return a silent NaN

def _check_finite(name, x):
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} holds a NaN or inf value (first at index {bad}); "
                         f"check the reward function / the forward pass that produced it")


def _check_shape(name, x, shape):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _group_index(group_ids, n):
    """Map arbitrary per-response prompt ids to 0..n_groups-1 and check G >= 2.

    Example: group_ids [7, 3, 7, 3] -> index [1, 0, 1, 0], counts [2, 2].
    """
    if group_ids.dim() != 1 or group_ids.numel() != n:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({n},)")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError("group_ids must be an integer tensor (one prompt id per response)")
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        lonely = torch.unique(group_ids)[counts < 2][:5].tolist()
        raise ValueError(f"group_ids {lonely} have a single response; GRPO needs at least "
                         f"2 responses per prompt (set n >= 2 samples per prompt)")
    return index, counts


def _group_reduce(values, index, n_groups, how):
    """Reduce per-element values into one value per group. how: 'sum', 'amin', 'amax'."""
    out = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index, values, reduce=how, include_self=False)


# -----------------------------------------------------------------------------
# Step 0: GRPO advantage

def grpo_advantages(rewards, group_ids, eps=1e-6):
    """Step 0: Â_i = (r_i - mean_group(r)) / (std_group(r) + eps), Bessel-corrected std.

    rewards (N,) float, group_ids (N,) int: responses of one prompt share an id, in any
    order. A group whose rewards are all equal gets Â = 0 exactly (no rounding noise).

    Example: rewards [1, 0, 0, 1], group_ids [0, 0, 1, 1]
             -> [0.7071, -0.7071, -0.7071, 0.7071]   (std of {1, 0} is 0.7071)
    """
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor, got shape {tuple(rewards.shape)}")
    _check_finite("rewards", rewards)
    r = rewards.float()
    index, counts = _group_index(group_ids, r.numel())
    n_groups = counts.numel()
    mean = _group_reduce(r, index, n_groups, "sum") / counts             # (n_groups,)
    centred = r - mean[index]                                            # (N,)
    var = _group_reduce(centred ** 2, index, n_groups, "sum") / (counts - 1)
    adv = centred / (var.sqrt()[index] + eps)
    # all-equal groups: the float mean can differ from r by an ulp, and ulp / 1e-6 is not 0
    spread = _group_reduce(r, index, n_groups, "amax") - _group_reduce(r, index, n_groups, "amin")
    return torch.where(spread[index] > 0, adv, torch.zeros_like(adv))


# -----------------------------------------------------------------------------
# Step 1: visual focus score (no external supervision)

def visual_prototype(prompt_hidden, image_mask, chunk=512):
    """v_i: mean last-layer state over the image placeholder positions of the prompt.

    prompt_hidden (N, P, D) any float dtype, image_mask (N, P) bool -> (N, D) float32.
    A prompt with no image gets the zero vector (its cosine scores are then 0).
    Summed in float32, `chunk` prompt positions at a time (no float32 copy of all P).
    """
    total = 0
    for h, m in zip(prompt_hidden.split(chunk, dim=1), image_mask.split(chunk, dim=1)):
        total = total + torch.bmm(m.to(torch.float32).unsqueeze(1), h.float()).squeeze(1)  # (N, D)
    count = image_mask.sum(dim=1, keepdim=True).clamp(min=1)             # (N, 1)
    return total / count


def visual_focus(response_hidden, prompt_hidden, image_mask, eps=1e-8, chunk=64):
    """Step 1: s_{i,t} = cos(h_{i,t}, v_i), the raw visual focus score of every token.

    response_hidden (N, T, D): last decoder layer's output (after the final norm, what
                               feeds lm_head) at the response positions.
    prompt_hidden   (N, P, D): the same states at the prompt positions.
    image_mask      (N, P)   : True at image placeholder positions (all images).
    Returns s (N, T) float32 in [-1, 1]; bf16/fp16 inputs are promoted to float32,
    `chunk` response positions at a time so the float32 copy stays small (in cache on a
    CPU, a few MB on a GPU) instead of a second (N, T, D) tensor.
    """
    if response_hidden.dim() != 3 or prompt_hidden.dim() != 3:
        raise ValueError(f"response_hidden {tuple(response_hidden.shape)} and prompt_hidden "
                         f"{tuple(prompt_hidden.shape)} must both be (N, len, D)")
    n, p, d = prompt_hidden.shape
    if response_hidden.shape[0] != n or response_hidden.shape[2] != d:
        raise ValueError(f"response_hidden {tuple(response_hidden.shape)} does not match "
                         f"prompt_hidden {tuple(prompt_hidden.shape)} in N or D")
    _check_shape("image_mask", image_mask, (n, p))
    v = visual_prototype(prompt_hidden, image_mask.bool())               # (N, D)
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=eps)
    scores = []
    for h in response_hidden.split(chunk, dim=1):
        h = h.float()                                                    # (N, chunk, D)
        dot = torch.bmm(h, v.unsqueeze(-1)).squeeze(-1)                  # (N, chunk)
        scores.append(dot / h.norm(dim=-1).clamp(min=eps))
    return torch.cat(scores, dim=1) if scores else response_hidden.new_zeros(n, 0).float()


# -----------------------------------------------------------------------------
# Step 2: visual attention compensation (Eq. 5)

def relative_position(response_mask):
    """x_{i,t} = t / (T_i - 1) on valid tokens (0 when T_i = 1), in float64.

    Example: a response of 3 valid tokens padded to 5 -> [0, 0.5, 1, 0, 0] (pad = 0).
    float64 so that thresholds such as x >= s0 are decided exactly as in the spec.
    """
    lengths = response_mask.sum(dim=1, keepdim=True)                     # (N, 1)
    t = torch.arange(response_mask.shape[1], device=response_mask.device)
    x = t.double() / (lengths - 1).clamp(min=1).double()                 # (N, T)
    return x * response_mask


def visual_compensation(response_mask, beta=0.3, schedule="linear", start=0.0, exponent=2.0,
                 step_at=0.5):
    """Eq. 5: the progressive visual incentive c_{i,t}, growing along the response.

    x = relative position (0 at the first token, 1 at the last), s0 = start:
      linear: c = β (x - s0) / (1 - s0 + 1e-8) where x >= s0, else 0
      exp:    c = β clamp((x - s0) / (1 - s0), 0, 1)^p
      step:   c = β where x >= step_at and x >= s0, else 0
    Example (linear, β = 0.3, s0 = 0): 5 valid tokens -> [0, .075, .15, .225, .3].
    Returns (N, T) float32, 0 on padding.
    """
    x = relative_position(response_mask)
    if schedule == "linear":
        c = torch.where(x >= start, beta * (x - start) / (1 - start + 1e-8), 0.0)
    elif schedule == "exp":
        c = beta * ((x - start) / (1 - start)).clamp(0, 1) ** exponent
    elif schedule == "step":
        c = torch.where((x >= step_at) & (x >= start), beta, 0.0)
    else:
        raise ValueError(f"schedule={schedule!r}; choose one of {SCHEDULES}")
    return (c * response_mask).float()


# -----------------------------------------------------------------------------
# Step 3: visual gate (Eq. 6)

def visual_gate(w, response_mask, kappa=0.2, gamma=0.5):
    """Eq. 6: G_{i,t} = 1 for the most visually active tokens of the response's tail.

    Tail = valid tokens with index >= floor(γ T_i); k = max(1, floor(κ n_tail));
    τ = the k-th largest w in the tail; G = 1 where a tail token has w >= τ (ties in).
    Example: w = [.9, .1, .5, .7, .2, .4], γ = .5, κ = .5 -> tail = [.7, .2, .4],
             k = 1, τ = .7 -> G = [0, 0, 0, 1, 0, 0] (the early .9 is not in the tail).
    w (N, T) float32, response_mask (N, T) bool -> G (N, T) bool.
    """
    lengths = response_mask.sum(dim=1, keepdim=True)                     # (N, 1)
    # index arithmetic in float64, so floor(0.2 * 15) is 3 and not 2.9999
    tail_start = torch.floor(lengths.double() * gamma).long()            # (N, 1)
    n_tail = lengths - tail_start
    k = torch.floor(n_tail.double() * kappa).long().clamp(min=1)         # (N, 1)
    # Gather each tail into a fixed-width buffer (the longest possible tail, known
    # without a device sync) and take its top-k: half the work of sorting every row.
    T = w.shape[1]
    width = T - math.floor(T * gamma)
    k_max = max(1, math.floor(width * kappa))
    col = tail_start + torch.arange(width, device=w.device)              # (N, width)
    tail_w = w.gather(1, col.clamp(max=T - 1))
    tail_w = torch.where(col < lengths, tail_w, float("-inf"))
    tau = tail_w.topk(k_max, dim=1).values.gather(1, k - 1)              # (N, 1) k-th largest
    t = torch.arange(T, device=w.device)
    tail = response_mask & (t >= tail_start)                             # (N, T)
    return tail & (w >= tau)


# -----------------------------------------------------------------------------
# Steps 4-6: intra- and inter-trajectory re-weighting, final token advantage

def _minmax_per_response(x, response_mask):
    """Min-max of x over each response's valid tokens (range + 1e-8); 0 on padding."""
    lo = torch.where(response_mask, x, float("inf")).amin(dim=1, keepdim=True)
    hi = torch.where(response_mask, x, float("-inf")).amax(dim=1, keepdim=True)
    return torch.where(response_mask, (x - lo) / (hi - lo + 1e-8), 0.0)


def intra_weights(w_hat, response_mask):
    """Eq. 7-8: ψ_{i,t} = clamp(1 + ŵ_{i,t} - mean_t ŵ_{i,·}, 0.1, 2.0); 1 on padding.

    ŵ (N, T) is already min-max normalised per response. Without the clamp, ψ averages
    to exactly 1 over a response: credit moves between tokens, none is created.
    Example: ŵ = [0, .5, 1] -> mean .5 -> ψ = [.5, 1, 1.5].
    """
    lengths = response_mask.sum(dim=1, keepdim=True)
    mean = (w_hat * response_mask).sum(dim=1, keepdim=True) / lengths    # (N, 1)
    psi = (1 + w_hat - mean).clamp(0.1, 2.0)
    return torch.where(response_mask, psi, 1.0)


def inter_weights(phi, index, counts):
    """Eq. 9-11: α_i = clamp(1 + φ̂_i - mean_group(φ̂), 0.9, 2.0).

    φ (N,) is the visual accumulation Σ_t ŵ_{i,t}; φ̂ is its min-max within the group
    (range + 1e-8). Responses that look at the image more than their siblings get more
    credit (or more blame): the clamp at 0.9 keeps the least visual ones close to GRPO.
    Example: φ = [2, 4, 6, 8] in one group -> φ̂ = [0, 1/3, 2/3, 1], mean 1/2
             -> α = [0.9 (clamped from .5), .8333 -> 0.9, 1.1667, 1.5].
    """
    n_groups = counts.numel()
    lo = _group_reduce(phi, index, n_groups, "amin")
    hi = _group_reduce(phi, index, n_groups, "amax")
    phi_hat = (phi - lo[index]) / (hi - lo + 1e-8)[index]                # (N,)
    mean = _group_reduce(phi_hat, index, n_groups, "sum") / counts
    return (1 + phi_hat - mean[index]).clamp(0.9, 2.0)


def _checked_inputs(rewards, focus, response_mask, has_image, schedule, gamma, kappa, start):
    """vgpo_advantages' argument checks, each a clear error; returns has_image as (N,) bool."""
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor, got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if focus.dim() != 2 or focus.shape[0] != n:
        raise ValueError(f"focus has shape {tuple(focus.shape)}, expected ({n}, T)")
    _check_shape("response_mask", response_mask, focus.shape)
    if response_mask.dtype != torch.bool:
        raise ValueError(f"response_mask must be a bool tensor, got {response_mask.dtype}")
    if has_image is None:
        has_image = torch.ones(n, dtype=torch.bool, device=focus.device)
    _check_shape("has_image", has_image, (n,))
    has_image = has_image.bool()
    if not response_mask.any(dim=1).all():
        empty = (~response_mask.any(dim=1)).nonzero()[:5, 0].tolist()
        raise ValueError(f"response_mask rows {empty} have no valid token; every response "
                         f"needs at least one (its EOS)")
    if (response_mask[:, 1:] & ~response_mask[:, :-1]).any():
        raise ValueError("response_mask must be left-aligned (valid tokens first, then "
                         "padding); build it from the first EOS position")
    _check_finite("focus (on valid tokens)", torch.where(response_mask, focus, 0.0))
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; choose one of {SCHEDULES}")
    if not (0 <= gamma < 1 and 0 <= kappa <= 1 and 0 <= start < 1):
        raise ValueError(f"need 0 <= gamma < 1, 0 <= kappa <= 1, 0 <= start < 1; got "
                         f"gamma={gamma}, kappa={kappa}, start={start}")
    return has_image


def vgpo_advantages(rewards, group_ids, focus, response_mask, has_image=None, *,
                    intra=True, inter=True, compensation=True, gate=True,
                    beta=0.3, kappa=0.2, gamma=0.5, schedule="linear", start=0.0,
                    exponent=2.0, step_at=0.5, phi_mean=False):
    """Steps 0-6: the token-level VGPO advantage A_{i,t} = Â_i · α_i · ψ_{i,t}.

    rewards       (N,)   float, one verifiable reward per response
    group_ids     (N,)   int, the prompt id of each response (rows of a group anywhere)
    focus         (N, T) float, raw s from visual_focus (values on padding are ignored)
    response_mask (N, T) bool, valid tokens (up to and including the first EOS),
                         left-aligned; every response needs at least one valid token
    has_image     (N,)   bool, False for prompts without an image (default all True);
                         must be the same for every response of a group
    intra, inter, compensation, gate: the ablation switches; each factor is 1 when its
                         switch is off, so all four off is exactly GRPO.
    beta (β), kappa (κ), gamma (γ), schedule, start (s0), exponent (p), step_at: the
                         compensation and gate hyper-parameters (Eq. 5-6).
    phi_mean:            a CONTROL, not the paper (off by default): φ_i as the mean of ŵ over
                         the response's tokens instead of the sum of Eq. 9, so that α no
                         longer grows with a response's length (train.py --control_phi_mean).

    Returns (advantages (N, T) float32 with 0 on padding, stats) where stats holds the
    intermediate tensors: grpo (N,), w, compensation, gate, w_tilde, w_hat, psi (N, T),
    phi, alpha (N,).
    """
    # ---- checks: shapes, masks, finite focus, hyper-parameter ranges ----
    has_image = _checked_inputs(rewards, focus, response_mask, has_image, schedule, gamma, kappa, start)
    n = rewards.numel()

    adv = grpo_advantages(rewards, group_ids)                            # (N,)  Step 0
    index, counts = _group_index(group_ids, n)
    n_groups = counts.numel()
    if (_group_reduce(has_image.float(), index, n_groups, "amin")
            != _group_reduce(has_image.float(), index, n_groups, "amax")).any():
        raise ValueError("has_image differs between responses of one group; a group is "
                         "the responses of one prompt and shares its images")
    mask = response_mask
    s = focus.float()

    # ---- Step 1: w = min-max of s over all valid tokens of the group ----
    # scope = the group, not the micro-batch (deviation 1 of the module docstring).
    # A prompt without an image gets w = 0, which makes ŵ = 0, ψ = 1 and α = 1 exactly.
    # min over the group = min over its responses of each response's own min
    lo = torch.where(mask, s, float("inf")).amin(dim=1)                  # (N,)
    hi = torch.where(mask, s, float("-inf")).amax(dim=1)
    lo = _group_reduce(lo, index, n_groups, "amin")[index].unsqueeze(1)  # (N, 1)
    hi = _group_reduce(hi, index, n_groups, "amax")[index].unsqueeze(1)
    w = torch.where(mask & has_image.unsqueeze(1), (s - lo) / (hi - lo + 1e-8), 0.0)

    # ---- Steps 2-3: compensated weight w̃ = w (1 + G c), Eq. 5-6 ----
    if compensation:
        c = visual_compensation(mask, beta, schedule, start, exponent, step_at)
    else:
        c = torch.zeros_like(w)
    g = visual_gate(w, mask, kappa, gamma) if gate else mask.clone()
    w_tilde = w * (1 + g * c)

    # ---- Step 4: intra-trajectory ψ, Eq. 7-8 ----
    # with intra off, the accumulation of Step 5 uses the uncompensated w
    w_hat = _minmax_per_response(w_tilde if intra else w, mask)
    psi = intra_weights(w_hat, mask) if intra else torch.ones_like(w)

    # ---- Step 5: inter-trajectory α, Eq. 9-11 ----
    phi = (w_hat * mask).sum(dim=1)                                      # (N,)
    if phi_mean:                                 # the length control: a mean instead of Eq. 9's sum
        phi = phi / mask.sum(dim=1)
    alpha = inter_weights(phi, index, counts) if inter else torch.ones_like(phi)

    # ---- Step 6: A = Â α ψ ----
    advantages = torch.where(mask, adv.unsqueeze(1) * alpha.unsqueeze(1) * psi, 0.0)

    stats = dict(grpo=adv, w=w, compensation=c * mask, gate=g & mask, w_tilde=w_tilde,
                 w_hat=w_hat, psi=psi, phi=phi, alpha=alpha)
    return advantages, stats


# -----------------------------------------------------------------------------
# Policy loss (DAPO) and KL penalty

def policy_loss(logp, old_logp, advantages, response_mask, *, clip_low=0.2,
                clip_high=0.28, clip_dual=3.0, num_tokens=None):
    """DAPO's clipped surrogate: clip-higher, dual-clip, token mean over the mini-batch.

    ρ = exp(clamp(logp - old_logp, -20, 20))
    A >= 0: loss = max(-A ρ, -A clip(ρ, 1 - ε_low, 1 + ε_high))
    A <  0: loss = min(that, -A c)   (dual clip: a very unlikely bad token costs <= c|A|)

    The per-token losses are summed and divided by num_tokens, the number of valid tokens
    in the whole global mini-batch (all micro-batches, all ranks): summing this loss over
    micro-batches then gives the same gradient however the mini-batch is split. With
    num_tokens=None it is this call's own count (one micro-batch = the mini-batch).

    logp, old_logp, advantages (N, T) float; response_mask (N, T) bool.
    Returns (loss scalar, metrics) where each metric is normalised by num_tokens too, so
    it also sums over micro-batches into a global-mini-batch token mean:
    clipfrac_upper / clipfrac_lower / clipfrac_dual (fractions of tokens clipped),
    approx_kl (k3 estimate of KL(old || new)), entropy (-logp, a proxy).
    """
    for name, x in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        _check_shape(name, x, response_mask.shape)
    mask = response_mask.float()
    if num_tokens is None:
        num_tokens = mask.sum()
    if not torch.as_tensor(num_tokens).gt(0).all():
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    log_ratio = (logp.float() - old_logp.float()).clamp(-20.0, 20.0)    # (N, T)
    ratio = log_ratio.exp()
    a = advantages.float()
    loss_unclipped = -a * ratio
    loss_clipped = -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    loss = torch.where(a < 0, torch.minimum(loss, -a * clip_dual), loss)
    total = (loss * mask).sum() / num_tokens

    with torch.no_grad():
        def token_mean(x):
            return (x.float() * mask).sum() / num_tokens
        metrics = dict(
            clipfrac_upper=token_mean((a > 0) & (ratio > 1 + clip_high)),
            clipfrac_lower=token_mean((a < 0) & (ratio < 1 - clip_low)),
            clipfrac_dual=token_mean((a < 0) & (ratio > clip_dual)),
            approx_kl=token_mean(ratio - 1 - log_ratio),
            entropy=token_mean(-logp.detach().float()),
        )
    return total, metrics


def kl_penalty(logp, ref_logp, kind="low_var_kl"):
    """Per-token KL estimate between the policy and a frozen reference, (N, T).

    kind: "k1"         logp - ref                      (unbiased, high variance)
          "k2"         0.5 (logp - ref)^2
          "low_var_kl" k3 = exp(ref - logp) - (ref - logp) - 1, always >= 0; the log-ratio
                       is clamped to [-20, 20] and the result to <= 10 so one token that
                       the reference finds absurd cannot blow the loss up.
    The paper's recipe keeps the KL term off; when on, its coefficient is 1e-2.
    """
    _check_shape("ref_logp", ref_logp, logp.shape)
    diff = logp.float() - ref_logp.float()
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff ** 2
    if kind == "low_var_kl":
        d = (-diff).clamp(-20.0, 20.0)
        return (d.exp() - d - 1).clamp(max=10.0)
    raise ValueError(f"kind={kind!r}; choose one of 'k1', 'k2', 'low_var_kl'")
