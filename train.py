"""
Train a vision-language model with VGPO (or plain DAPO/GRPO) on verifiable rewards.

    python train.py                                   # tiny Qwen2.5-VL, synthetic task, CPU
    python train.py --no_vgpo                         # the same with plain DAPO (ablation)
    torchrun --nproc_per_node 2 train.py              # 2 processes (gloo on CPU, NCCL on GPU)
    python smoke.py                                   # on a GPU machine, first: the 7B path on a toy model
    torchrun --nproc_per_node 8 train.py --preset paper7b     # the paper's 7B recipe, 1 node (FSDP2)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr node0 --master_port 29500 \\
        train.py --preset paper7b --out_dir /shared/vgpo7b   # 2 nodes; --node_rank 1 on the other
    python train.py --out_dir out --resume            # continue from out/checkpoints/latest

With no arguments it builds a tiny Qwen2.5-VL, warm-starts it on a synthetic task (count red,
green, blue squares in turn: "\\boxed{r2g1b3}", tiny.py) and trains it with VGPO, in about 6
minutes on a laptop CPU. The same code trains --model Qwen/Qwen2.5-VL-7B-Instruct on hub data.

Reading order: this file, then vgpo.py (the paper's equations), then rollout.py (prompts,
sampling, rewards, the scoring forward): the whole algorithm. Plumbing is one call into a
file named for its job, which a first reading skips: config.py (flags), parallel.py (ranks,
FSDP2), models.py (loading, memory plan), dataset.py (rows and their checks), checkpoints.py
(checkpoints, resume, the log), tiny.py (the embedded model and tasks).

How one step differs from textbook GRPO, in order:
 1. Rollout: the ranks sample n responses for each prompt of a round, split between them;
    groups whose responses are all right or all wrong are dropped, and the next round
    samples only the shortfall, up to --max_tries rounds (DAPO dynamic sampling, pooled
    over ranks). Over-long prompts are dropped, never cut.
 2. One no-grad forward of the sampling policy gives the old log-probs AND the last-layer
    states, from which vgpo.visual_focus scores every response token.
 3. Advantages: vgpo.vgpo_advantages re-weights each response's GRPO advantage token by
    token (Eq. 5-11); every rank owns whole groups, so this needs no communication.
 4. Update: DAPO loss (clip-higher, dual clip, token mean over the global mini-batch),
    no KL term by default, AdamW, gradient clipping; a non-finite gradient skips the step.
 5. Data parallel by an explicit gradient all-reduce (SUM) after each mini-batch rather
    than torch DDP: ranks may hold different numbers of micro-batches after filtering,
    and a prompt without images leaves the vision tower without gradient; both are fine
    here, and with the loss divided by the global token count the SUM is exactly the
    gradient of the global token mean.
 6. --fsdp (on in the 7B preset): FSDP2 shards weights, gradients and AdamW state over
    the ranks instead, one unit per decoder layer and vision block; the backward
    reduce-scatters the same SUM. Rollout, scoring and validation run with the full
    weights gathered once (parallel.full_weights). Checkpoints stay save_pretrained folders.
"""

import math
import random
import sys
import time
from dataclasses import dataclass

import torch

import checkpoints
import config
import dataset
import decode
import models
import parallel
import rollout
import tiny
import vgpo

# -----------------------------------------------------------------------------
# ---- rollout ----: sample, reward, filter


def rewards(texts, golds, args):
    """One reward per response: the paper's accuracy, or the --reward module:function.
    Example: --reward my_rewards:length_penalty imports my_rewards.py (from the working
    folder or PYTHONPATH) and calls length_penalty(texts, golds) -> [float, ...]."""
    # accuracy only, as the paper trains: no format reward, no length penalty
    if args.reward == "accuracy":
        return rollout.accuracy_rewards(texts, golds, args.bare_answers)
    return rollout.custom_rewards(args.reward, texts, golds)


def encode_examples(processor, examples, args):
    """Process prompts once, then drop over-long ones (never cut them: a cut prompt can lose its
    question or an image). Returns the batch, its images per row (B,), the examples kept, n too long."""
    # pixel_values holds every image's patches, in row order; images_per_row says whose
    batch, images_per_row = rollout.encode_prompts(processor, examples, args.instruction)
    fits = batch["attention_mask"].sum(dim=1) <= args.max_prompt_len              # (B,)
    n_long = int((~fits).sum())
    if n_long and n_long < len(examples):
        batch, images_per_row = rollout.take_rows(batch, images_per_row, fits.nonzero().flatten())
    return batch, images_per_row, [ex for ex, ok in zip(examples, fits.tolist()) if ok], n_long


def sample(policy, processor, batch, images_per_row, rows, args, device, budget=None):
    """One response for each of `rows` (prompt indices, G per prompt) at the training temperature,
    in generate() calls sized by the memory plan at the prompts' lengths (budget; else --gen_batch
    rows a call). Returns responses, masks (n, T), truncated (n,) and the row-steps decoded."""
    responses, masks, truncs, row_steps = [], [], [], 0
    policy.eval()
    prompt_lens = batch["attention_mask"].sum(dim=1)[rows]                        # (n,)
    calls = budget.calls(prompt_lens, args.max_new_tokens) if budget else \
        list(torch.arange(len(rows)).split(args.gen_batch))
    # where decoding continues from a cache (decode.py), a prompt is prefilled once for its samples
    shared = decode.shares_prefill(policy.model.config, args.decode_cache)
    for call in calls:
        prompts, repeats = decode.distinct_prompts(rows[call], shared)
        gen_batch, _ = rollout.take_rows(batch, images_per_row, prompts)
        with rollout.autocast(device):
            # sampling settings are explicit, never the checkpoint's generation_config (rollout.py)
            r, m, t = policy.generate(processor, rollout.to_device(gen_batch, device), repeats=repeats,
                                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, cache=args.decode_cache, segment=args.decode_segment)
        responses.append(r.cpu()), masks.append(m.cpu()), truncs.append(t.cpu())
        row_steps += decode.row_steps(m.sum(dim=1), args.decode_segment if shared else 0)
    # calls end at different lengths: right-pad them to one width, then back in the order of rows
    back = torch.cat(calls).argsort()
    pad_id = processor.tokenizer.pad_token_id
    return (rollout.pad_right(responses, pad_id)[back], rollout.pad_right(masks, False)[back],
            torch.cat(truncs)[back], row_steps)


# what collect_rollouts counts on this rank; summed over ranks for the step's log
COUNTED = ("long_prompts", "sampled_groups", "zero_std_groups", "reward_sum", "len_sum", "truncated",
           "responses", "row_steps")


def sample_groups(policy, processor, data, indices, first_group, args, ranks, bad_rows, counts, budget):
    """One round on this rank: G responses for each prompt of `indices` (stream positions first_group,
    + world, ...), rewarded; the informative groups kept, in stream order; COUNTED added to `counts`."""
    # bad rows are skipped and counted (or stop the run) by the ledger (dataset.py)
    examples = dataset.fetch_examples(data, indices, bad_rows, first_group, need_image=args.fsdp,
                                      stride=ranks.world)
    batch, images_per_row, examples, n_long = encode_examples(processor, examples, args) if examples \
        else (None, None, [], 0)
    counts["long_prompts"] += n_long
    if not examples:
        return rollout.Rollout.empty()
    rows = torch.arange(len(examples)).repeat_interleave(args.group_size)   # (n,): G rows per prompt
    responses, masks, truncated, row_steps = sample(policy, processor, batch, images_per_row, rows, args,
                                                    ranks.device, budget)     # (n, T) each
    texts = processor.batch_decode(torch.where(masks, responses, processor.tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    # the verifiable reward: 1 if the last \boxed{} equals the gold answer, else 0 (no format term)
    reward = torch.tensor(rewards(texts, [examples[r]["answer"] for r in rows.tolist()], args))  # (n,)
    group_ids = torch.tensor([examples[r]["group"] for r in rows.tolist()])                     # (n,)
    # DAPO's online filter: a group whose rewards are all equal has zero advantage everywhere
    # and would only dilute the token mean; drop it and sample more prompts instead
    keep = rollout.informative_groups(reward, group_ids)                                       # (n,)
    counts["sampled_groups"] += len(examples)
    counts["zero_std_groups"] += len(examples) - int(keep.sum()) // args.group_size
    counts["reward_sum"] += float(reward.sum())
    counts["len_sum"] += float(masks.sum())
    counts["truncated"] += int(truncated.sum())
    counts["responses"] += len(rows)
    counts["row_steps"] += row_steps
    if not keep.any():
        return rollout.Rollout.empty()
    prompts, row_images = rollout.take_rows(batch, images_per_row, rows[keep])
    return rollout.Rollout(prompts, row_images, responses[keep], masks[keep], reward[keep], group_ids[keep])


def round_size(need, kept, drawn, rollout_batch):
    """Prompts the next round of dynamic sampling draws, all ranks together: the first round
    draws --rollout_batch; a later one the shortfall over the keep rate p seen so far in this
    step, plus 3 standard deviations of a binomial count (a round falls short about 1 time
    in 700), at most twice --rollout_batch (a step that keeps nothing does not explode).
    Example: 212 wanted, 300 kept of 512 drawn (p = 0.59) -> (212 + 3 sqrt(212 x 0.41)) / p = 410."""
    if drawn == 0:
        return need
    rate = max(kept, 1) / drawn
    return min(math.ceil((need + 3 * math.sqrt(need * (1 - rate))) / rate), 2 * rollout_batch)


def collect_rollouts(policy, processor, data, stream, args, ranks, bad_rows, budget=None):
    """DAPO dynamic sampling, pooled over ranks: rounds of sampling until ALL ranks
    together hold --rollout_batch informative groups (or --max_tries rounds have run).

    Each round draws round_size() prompts from the shared stream, split over the ranks;
    every drawn prompt is sampled. The informative groups found fill the shortfall, taken
    from the ranks holding the fewest so far (parallel.fair_shares; each rank's first in
    stream order), so the step keeps exactly --rollout_batch groups, chosen the same way on
    every rank, and ranks may hold unequal numbers of them.
    budget: the rows of each generate() call (sample). Returns this rank's kept groups as
    one Rollout, and the counts of COUNTED (plus "tries")."""
    kept, counts = [], dict.fromkeys(COUNTED, 0.0)
    n_kept, drawn, tries = 0, 0, 0                       # all ranks together: the same on every rank
    held = [0] * ranks.world                             # each rank's kept groups, known to every rank
    while n_kept < args.rollout_batch and tries < args.max_tries:
        tries, need = tries + 1, args.rollout_batch - n_kept
        parallel.entering(f"rollout, sampling round {tries}")      # named if a collective times out
        n = round_size(need, n_kept, drawn, args.rollout_batch)
        # every rank takes the same n from the shared stream and samples every world-th prompt
        # from its rank on, so every mini-batch (cut in stream order) spreads over the ranks
        first, indices = stream.position, stream.take(n)
        found = sample_groups(policy, processor, data, indices[ranks.rank::ranks.world], first + ranks.rank,
                              args, ranks, bad_rows, counts, budget)
        # every rank's informative groups this round, in rank order: [3, 5] on 2 ranks
        per_rank = torch.zeros(ranks.world)
        per_rank[ranks.rank] = len(found) // args.group_size
        # what each rank keeps: computed alike on every rank from the same all-reduced counts
        take = parallel.fair_shares(held, [int(f) for f in ranks.reduce(per_rank)], need)
        if take[ranks.rank]:
            kept.append(found.first_groups(take[ranks.rank] * args.group_size))
        held = [h + t for h, t in zip(held, take)]
        n_kept += sum(take)
        drawn += n
    counts["tries"] = tries
    return rollout.Rollout.concat(kept, processor.tokenizer.pad_token_id), counts


@torch.no_grad()
def score_rollouts(policy, samples, args, device, focus=True):
    """The no-grad forward of step 2: old log-probs and visual focus for every row."""
    parallel.entering("scoring")
    policy.eval()
    # Step 2's no-grad forward of the sampling policy (the PPO 'old' policy): its log-probs
    # are the ratio's denominator, and its last-layer states give the focus scores, so focus
    # comes from the policy that wrote the responses, not from one half-way through an update.
    logp = torch.zeros(samples.mask.shape)                                      # (N, T)
    scores = torch.zeros(samples.mask.shape)                                    # (N, T)
    for rows in models.micro_batches(samples, torch.arange(len(samples)), args):
        prompts, responses, mask, width = samples.micro(rows, device)
        with rollout.autocast(device):
            lp, f = policy.score(prompts, responses, mask, temperature=args.temperature, focus=focus,
                                 logp_chunk=args.logp_chunk)
        logp[rows, :width] = lp.float().cpu()
        if focus:
            scores[rows, :width] = f.cpu()
    return logp, scores


# -----------------------------------------------------------------------------
# ---- advantages ----

def vgpo_switches(args):
    """The flags of vgpo.vgpo_advantages: the ablation switches and Eq. 5-6's parameters."""
    return dict(intra=args.intra, inter=args.inter, compensation=args.compensation, gate=args.gate,
                beta=args.beta, kappa=args.kappa, gamma=args.gamma, schedule=args.schedule,
                start=args.comp_start, exponent=args.exponent, step_at=args.step_at,
                phi_mean=args.control_phi_mean)


def shuffle_within_responses(focus, mask):
    """--control_shuffle_focus: each response's focus values in a random order among its own
    valid tokens. Lengths and each response's values are kept, the link between a token
    and how much it looks at the image is not: what VGPO gains then is not visual guidance.
    Example: focus [[.1, .5, .9, pad]] -> e.g. [[.9, .1, .5, pad]]. Seeded by the step's seed."""
    keys = torch.rand(focus.shape).masked_fill(~mask, float("inf"))       # padding sorts last
    order = keys.argsort(dim=1)                  # valid positions first (left-aligned), shuffled
    return torch.where(mask, focus.gather(1, order), focus)


def token_advantages(samples, focus, switches, shuffle_focus=False):
    """Step 3: vgpo.vgpo_advantages on this rank's groups (zero rows give zero tensors).
    shuffle_focus: the --control_shuffle_focus control (shuffle_within_responses)."""
    # an empty rollout still yields tensors of the right shape, so the step's statistics
    # all-reduce runs on this rank too (ranks must call the same collectives)
    if len(samples) == 0:
        empty_rows, empty_tokens = torch.zeros(0), torch.zeros(samples.mask.shape)
        return empty_tokens, dict(psi=empty_tokens, alpha=empty_rows, gate=samples.mask.clone())
    has_image = samples.images_per_row > 0          # (N,): prompts without an image get GRPO
    if shuffle_focus:
        focus = shuffle_within_responses(focus, samples.mask)
    return vgpo.vgpo_advantages(samples.reward, samples.group_ids, focus, samples.mask, has_image, **switches)


# -----------------------------------------------------------------------------
# ---- update ----

def mini_batch_rows(samples, args, ranks):
    """This rank's rows of each of the rollout_batch / mini_batch mini-batches. They are cut
    from ALL ranks' kept groups in stream order, so a mini-batch holds the same groups on
    any number of ranks, although ranks hold unequal numbers of them (collect_rollouts).
    Example: mini-batches of 2 groups, rank 0 holds groups [3, 7, 9] and rank 1 [5]: the
    order 3 5 7 9 gives {3, 5} and {7, 9}, so rank 0 updates [3] then [7, 9], rank 1 [5] then []."""
    ids = samples.group_ids[::args.group_size].tolist()                # one id per group of this rank
    place = {g: k for k, g in enumerate(sorted(ranks.gather_lists(ids)))}   # a group's place in the step
    group_rows = torch.arange(len(samples)).view(-1, args.group_size)     # (groups, G)
    out = []
    # a group's responses are always updated together
    for part in torch.tensor_split(torch.arange(len(place)), args.rollout_batch // args.mini_batch):
        chosen = set(part.tolist())
        mine = [k for k, g in enumerate(ids) if place[g] in chosen]
        out.append(group_rows[mine].flatten())
    return out


# what update_policy logs, each a sum over micro-batches and ranks of a token mean
LOGGED = ("loss", "clipfrac_upper", "clipfrac_lower", "clipfrac_dual", "approx_kl", "entropy", "kl",
          "grad_norm")


def micro_batch_loss(policy, samples, micro, num_tokens, args, device):
    """The loss of one micro-batch, already divided by the global mini-batch's token count,
    and its named metrics. With --kl_coef, plus the k3 KL to the frozen starting model."""
    prompts, responses, mask, width = samples.micro(micro, device)
    with rollout.autocast(device):
        # log π_θ of each sampled token at the sampling temperature: (n, width)
        logp, _ = policy.score(prompts, responses, mask, temperature=args.temperature,
                               logp_chunk=args.logp_chunk)
    # clipped surrogate with clip-higher and dual clip, weighted by A_{i,t} = Â_i α_i ψ_{i,t}
    loss, metrics = vgpo.policy_loss(logp, samples.old_logp[micro, :width].to(device),
                                     samples.adv[micro, :width].to(device), mask,
                                     clip_low=args.clip_low, clip_high=args.clip_high,
                                     clip_dual=args.clip_dual, num_tokens=num_tokens)
    # the paper trains without a KL term
    kl = torch.zeros((), device=device)
    if samples.ref_logp is not None:
        # k3 (low_var_kl) by default: never negative per token, with a low variance
        kl_tok = vgpo.kl_penalty(logp, samples.ref_logp[micro, :width].to(device), args.kl_kind)    # (n, w)
        kl = (kl_tok * mask).sum() / num_tokens
        loss = loss + args.kl_coef * kl
    return loss, dict(metrics, loss=loss.detach(), kl=kl.detach())


def update_policy(policy, optimizer, params, samples, args, ranks, probe=None):
    """Step 4: PPO-style updates over the rollout batch, one optimizer step a mini-batch.

    The rollout's groups are split into rollout_batch / mini_batch mini-batches; each
    mini-batch's loss is the token mean over ALL its valid tokens on every rank (the
    count is all-reduced first), its gradient is summed over micro-batches and ranks,
    clipped, and applied unless it is not finite. probe: FSDP's one-row rollout
    (parallel.as_many_passes_as_the_busiest_rank), None without FSDP. Returns {name: sum over
    optimizer steps} of LOGGED, "updates" (optimizer steps) and "skipped" (non-finite gradients).
    """
    parallel.entering("update")
    policy.train()
    totals = dict.fromkeys(LOGGED, 0.0)              # summed over optimizer steps, then over ranks
    n_updates, skipped = 0, 0
    for _ in range(args.ppo_epochs):
        for rows in mini_batch_rows(samples, args, ranks):
            # DAPO's token mean over the GLOBAL mini-batch: each micro-batch's loss is divided by
            # the count of every valid token on every rank, so that summing gradients over
            # micro-batches and ranks (never averaging) gives exactly the gradient of that mean,
            # whatever the micro-batch size or the number of ranks.
            num_tokens = ranks.reduce(torch.tensor(float(samples.mask[rows].sum()) if len(rows) else 0.0))
            if num_tokens.item() == 0:
                continue
            num_tokens = num_tokens.to(ranks.device)
            # micro-batches bound memory only; the gradient does not depend on them (tested)
            micros = models.micro_batches(samples, rows, args)
            local = dict.fromkeys(LOGGED[:-1], 0.0)  # this rank's sums over its micro-batches
            # every rank runs as many micro-batches as the busiest one (FSDP's collectives)
            with parallel.as_many_passes_as_the_busiest_rank(policy, probe, len(micros), ranks,
                                                             args.logp_chunk):
                for micro in micros:
                    loss, metrics = micro_batch_loss(policy, samples, micro, num_tokens, args, ranks.device)
                    # gradients accumulate over micro-batches: the SUM the token mean above asks for
                    loss.backward()
                    for name, value in metrics.items():
                        local[name] += float(value)
            # data parallel: SUM the gradients over ranks (see the token mean above)
            parallel.sum_gradients(params, ranks, fsdp=args.fsdp)
            # clip the global norm (--grad_clip, paper 1.0); the norm also tells a NaN or inf apart
            grad_norm = parallel.clip_gradients(params, args.grad_clip)
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1                             # a non-finite gradient never reaches the weights
            optimizer.zero_grad(set_to_none=True)
            # the logged numbers: each a token mean over the global mini-batch, summed over ranks
            for name, value in ranks.sum_named(local).items():
                totals[name] += value
            totals["grad_norm"] += float(grad_norm)
            n_updates += 1
    return dict(totals, updates=n_updates, skipped=skipped)


# -----------------------------------------------------------------------------
# ---- validation ----

def validate(run, args):
    """Greedy accuracy of the run's policy on its validation set, sharded over ranks
    (rollout.answer_greedily, the same scoring as eval.py's benchmarks), with the mean
    response length and, with --val_focus, the late / early visual focus of the answers
    (rollout.focus_profile). On the colour and look tasks also where the chain goes wrong
    (tiny.chain_sums): accuracy and focus at each step, the share of late errors that copy
    the step before, blank-image accuracy on prior prompts (below), and the look figures."""
    parallel.entering("validation")
    policy, processor, data, ranks = run.policy, run.processor, run.val_data, run.ranks
    # the memory plan's room at the prompts' lengths, at most --val_batch prompts a call (with
    # --val_focus each row also carries the scoring forward's logits)
    budget = models.GenerationBudget(run.budget.room, run.budget.kv, run.budget.prefill, args.val_batch,
                                     models.scoring_bytes(policy.model.config) if args.val_focus else 0)
    policy.eval()
    chain = args.task in ("colour", "look") and args.val_data == "synthetic"
    # every rank answers every world-th example; the sums are reduced over ranks at the end
    mine = list(range(ranks.rank, len(data), ranks.world))
    sums = dict(correct=0.0, total=len(mine), tokens=0.0, early=0.0, n_early=0.0, late=0.0, n_late=0.0)
    if chain:                                        # the same keys on every rank, even one with no rows
        sums.update(tiny.chain_sums([], [], None))
    with parallel.full_weights(policy):              # under FSDP: gathered once for all the answers
        # under FSDP the answers come from the hook-free twin bound to the gathered weights
        # (parallel.hook_free_twin): no FSDP hook at every decoded token
        answerer = parallel.sampling_weights(run.sampler, policy) if args.fsdp else policy
        for start in range(0, len(mine), args.val_batch):
            examples = [data[i] for i in mine[start:start + args.val_batch]]
            records = rollout.answer_greedily(answerer, processor, examples, args.instruction,
                                              device=ranks.device, max_new_tokens=args.val_max_new_tokens,
                                              bare=args.bare_answers, focus=args.val_focus, budget=budget)
            sums["correct"] += sum(r["correct"] for r in records)
            sums["tokens"] += sum(r["length"] for r in records)
            if args.val_focus:
                # each answer's mean focus over its first and last third (rollout.focus_profile)
                focus = rollout.pad_right([r["focus"][None] for r in records], 0.0)                 # (B, T)
                ones = [torch.ones(1, len(r["focus"]), dtype=torch.bool) for r in records]
                mask = rollout.pad_right(ones, False)                                                # (B, T)
                thirds = rollout.focus_profile(focus, mask)                                         # (B, 3)
                for name, part in (("early", thirds[:, 0]), ("late", thirds[:, 2])):
                    sums[name] += float(part.nansum())
                    sums["n_" + name] += int((~part.isnan()).sum())
            if chain:
                steps = tiny.chain_sums(records, [ex["answer"] for ex in examples], processor.tokenizer)
                for name, value in steps.items():
                    sums[name] += value
        if chain:
            # every blank prompt is one input (one question, an empty image): greedy answers it once,
            # and its accuracy on prior prompts is that answer's prior probability (tiny.py): what it
            # writes without an image (0.21 for "r1g1b1"), not how much it reads one
            blank = tiny.colour_example(args.seed + 40_000, 0, blank=True, copy_prior=args.copy_prior)
            blank_answer = rollout.answer_greedily(answerer, processor, [blank], args.instruction,
                                                   device=ranks.device,
                                                   max_new_tokens=args.val_max_new_tokens,
                                                   bare=args.bare_answers)[0]["response"]
    total = ranks.sum_named(sums)
    answered = max(total["total"], 1)
    out = dict(val_acc=total["correct"] / answered, val_len=total["tokens"] / answered)
    if args.val_focus and total["n_early"] and total["n_late"]:
        # each response counts once (as in training's log and eval.py); the ratio of the means
        early, late = total["early"] / total["n_early"], total["late"] / total["n_late"]
        out.update(val_focus_early=early, val_focus_late=late,
                   val_focus_ratio=late / early if early > 0 else float("nan"))
    if chain:
        out.update(tiny.chain_metrics(total, total["total"], looks=args.task == "look"))
        out["val_blank_prior_acc"] = tiny.prior_probability(blank_answer, args.copy_prior)
    return out


# -----------------------------------------------------------------------------
# ---- set-up ----: processes, the policy, the data, and the step a resumed run starts at

@dataclass
class Run:
    """What set_up builds and the loop reads. The loop changes none of it: its own
    progress (the step, the skipped updates) lives in its locals, and the prompt stream
    and the bad-row ledger change only through the calls made on them in the loop."""
    ranks: parallel.Ranks
    policy: rollout.Policy
    sampler: rollout.Policy          # the weights generate() reads: the policy or its bf16 copy
    reference: rollout.Policy        # the frozen starting model of --kl_coef, else None
    processor: object
    params: list                     # the trained parameters (this rank's shards under FSDP)
    optimizer: torch.optim.Optimizer
    train_data: object
    val_data: object
    stream: dataset.PromptStream     # the shared order of prompts; its position is saved
    bad_rows: dataset.BadRows        # the ledger of bad training rows
    probe: rollout.Rollout           # FSDP's zero-loss pass (parallel.py), else None
    budget: models.GenerationBudget  # rows per generate() call, from the memory plan
    start_step: int                  # 0, or the resumed checkpoint's step
    skipped_updates: int             # updates skipped for a non-finite gradient so far
    total_steps: int                 # the schedule's length (an estimate when run by epochs)
    total_prompts: int               # --epochs passes of prompts, for a run by epochs

    def finished(self, step, args):
        """--max_steps steps, or (--max_steps -1) --epochs passes of prompts DRAWN: dynamic
        sampling draws more than rollout_batch prompts a step, so an epoch counts prompts."""
        if args.max_steps < 0:
            return self.stream.position >= self.total_prompts
        return step >= args.max_steps


def set_up(args, stop):
    """Processes, the policy, the optimizer, the data (checked), and where a resumed run
    continues. None when a resumed run has nothing left to do, or a signal cut the warm start."""
    ranks = parallel.start_ranks(args.dist_timeout)
    config.check_machine(args, ranks)                # flags that depend on the machine and the ranks
    torch.manual_seed(args.seed)                     # the same on every rank: any random init agrees
    # a new run, or the newest complete checkpoint of this one (refused if its flags differ)
    resume_from = checkpoints.start_or_resume(args, ranks.master)
    if resume_from:
        config.check_same_run(checkpoints.saved_config(resume_from), args, resume_from, ranks.master)
    # the embedded default: built once per out_dir, then (colour, look) its supervised warm start
    start_model = tiny.starting_model(args, ranks, stop) if args.model == "tiny" else args.model
    if checkpoints.stopped_in_set_up(ranks, stop, args.out_dir):    # a signal: nothing to save yet
        return None
    # the plan comes before loading: a 7B model takes minutes to load, a wrong --gen_batch should not
    budget = models.check_memory_plan(resume_from or start_model, args, ranks)    # rows per generate()

    # the policy (fast_vision: models.speed_up_vision, the same numbers, faster); under --fsdp
    # only rank 0 reads the weights, and the others receive their shards (parallel.shard)
    read, path = ranks.master or not args.fsdp, resume_from or start_model
    model, processor, attention = models.load_model(path, args, ranks.device, move=not args.fsdp,
                                                    fast_vision=args.fast_vision, weights=read)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False                   # training forwards never decode (generate() turns it on)
    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    policy, reference, units = rollout.Policy(model), None, 0
    if args.kl_coef > 0:                             # the reference is the starting model, never trained
        ref_model, _, _ = models.load_model(start_model, args, ranks.device, move=not args.fsdp,
                                            fast_vision=args.fast_vision, weights=read)
        reference = rollout.Policy(ref_model.requires_grad_(False))
    if args.fsdp:
        units = parallel.shard(policy, ranks.device, args.fsdp_offload, from_rank0=True)
        if reference is not None:
            parallel.shard(reference, ranks.device, args.fsdp_offload, from_rank0=True)
    params = [p for p in policy.parameters() if p.requires_grad]
    # AdamW as in the paper (lr 1e-6, weight decay 1e-2 in the preset); its state is fp32
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    # the data, checked before the first step; the colour task's training prompts carry a late-step
    # prior (--copy_prior), validation's do not
    train_data = dataset.open_data(args.train_data, args.train_split, args, seed_offset=0, size=-1,
                                   copy_prior=args.copy_prior)
    val_data = dataset.open_data(args.val_data, args.val_split, args, seed_offset=10_000, size=args.val_size)
    bad_rows = dataset.checked_training(train_data, args, ranks.master)
    val_data = dataset.checked_validation(val_data, args, ranks)
    stream = dataset.PromptStream(len(train_data), args.seed)
    total_prompts = math.ceil(args.epochs * len(train_data))
    # a decaying --lr_schedule needs the number of steps; by epochs it is an estimate
    total_steps = math.ceil(total_prompts / args.rollout_batch) if args.max_steps < 0 else args.max_steps
    start_step, skipped = 0, 0
    if resume_from:
        state = checkpoints.load_optimizer(policy, optimizer, resume_from, args)
        start_step, stream.position = state["step"], state["data_position"]
        skipped = state["last_metrics"].get("skipped_updates", 0)     # a running count in the log
    run = Run(ranks, policy, policy, reference, processor, params, optimizer, train_data, val_data, stream,
              bad_rows, None, budget, start_step, skipped, total_steps, total_prompts)
    if run.finished(start_step, args):
        if ranks.master:
            print(f"{resume_from}: the run is already complete (step {start_step}, "
                  f"{stream.position} prompts drawn); nothing to do")
        return None
    run.probe = parallel.fsdp_probe(processor, train_data, args) if args.fsdp else None
    run.sampler = parallel.sampling_copy(policy, args)
    if ranks.master:
        checkpoints.start_log_files(args, start_step)
        checkpoints.print_start(args, ranks, run, sum(p.numel() for p in model.parameters()), attention,
                                units, resume_from)
    return run


# -----------------------------------------------------------------------------
# ---- main ----: the loop

def parse_args(argv=None):                           # the flags and presets are in config.py
    return config.parse_args(argv, description=__doc__)


def main(argv=None):
    args = parse_args(argv)
    with checkpoints.StopSignal() as stop:           # SIGTERM / Ctrl-C: finish the step, save, stop
        run = set_up(args, stop)
        if run is not None and not checkpoints.stopped_in_set_up(run.ranks, stop, args.out_dir):
            train(args, run, stop)
    parallel.stop_ranks()


def train(args, run, stop):
    """rollout -> advantages -> update -> log & checkpoint, until the run is finished."""
    from tqdm import tqdm
    ranks, policy, processor, stream = run.ranks, run.policy, run.processor, run.stream
    bar = tqdm(total=run.total_steps, initial=run.start_step, disable=not ranks.master, unit="step")
    reporter = checkpoints.Reporter(args, ranks.master)
    step, skipped, row, stopping = run.start_step, run.skipped_updates, {}, False
    first_position = stream.position                # the bad-row share counts the prompts drawn since
    # the starting policy's validation, once, so that the log shows what RL added to it
    start = {}
    if step == 0 and args.val_every:
        start = validate(run, args)
        if ranks.master:
            bar.write("before training: " + checkpoints.format_metrics(start))
    while not run.finished(step, args):
        t0 = time.time()
        # every step re-seeds from (seed, rank, step): a resumed run samples exactly the same
        torch.manual_seed(args.seed * 1_000_003 + step * 1009 + ranks.rank)
        random.seed(args.seed * 1_000_003 + step * 1009 + ranks.rank)

        # ---- rollout ----
        # Every rank runs every line below, even with zero informative groups: the
        # gathers, all-reduces and FSDP collectives must be called the same on all ranks.
        with parallel.full_weights(policy):          # under FSDP: gathered once, no per-token gathers
            # generate() reads the policy's weights, or their bf16 copy (--sample_dtype)
            sampler = parallel.sampling_weights(run.sampler, policy)
            samples, counts = collect_rollouts(sampler, processor, run.train_data, stream, args, ranks,
                                               run.bad_rows, run.budget)
            samples.old_logp, focus = score_rollouts(policy, samples, args, ranks.device)   # (N, T) each
        if run.reference is not None:
            with parallel.full_weights(run.reference):
                samples.ref_logp, _ = score_rollouts(run.reference, samples, args, ranks.device, focus=False)

        # ---- advantages ----
        # (N, T): A = Â · α · ψ, the GRPO advantage re-weighted token by token (Eq. 5-11)
        samples.adv, stats = token_advantages(samples, focus, vgpo_switches(args), args.control_shuffle_focus)

        # ---- update ----
        lr = config.lr_at(step, run.total_steps, args)       # constant in the paper
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        update = update_policy(policy, run.optimizer, run.params, samples, args, ranks, probe=run.probe)
        skipped += update.pop("skipped")
        step += 1

        # ---- log & checkpoint ----
        tries = counts.pop("tries")                  # the same on every rank: not summed
        counts["kept_groups"] = len(samples) // args.group_size
        counts = ranks.sum_named(counts)
        # this step's bad rows; stops the run when the data is unusable (dataset.BadRows)
        bad = run.bad_rows.end_step(ranks, stream.position - first_position, counts, args.max_prompt_len)
        row = checkpoints.log_row(step, stream, len(run.train_data), counts, tries, bad, update, skipped, lr)
        row.update(checkpoints.vgpo_stats(stats, samples.mask, focus, ranks))
        if step == 1:
            row.update({f"start_{k}": v for k, v in start.items()})     # step 0's validation
        last = run.finished(step, args)
        if (args.val_every and step % args.val_every == 0) or last:
            row.update(validate(run, args))
        row["time"] = time.time() - t0
        # one MAX over ranks: the largest peak memory, and whether any rank was asked to stop
        flags = ranks.max_named(dict(peak=parallel.peak_memory(ranks.device), stop=stop.received is not None))
        row["peak_mem_gb"], stopping = flags["peak"] / 2**30, flags["stop"] > 0
        save = (args.save_every and step % args.save_every == 0) or last or stopping
        if save and not args.fsdp:                   # under FSDP there is one copy, nothing to compare
            row["replica_divergence"] = parallel.replica_divergence(run.params, ranks)
        bar.update(1)
        if ranks.master:                             # the log line first: a resume drops lines after its step
            checkpoints.print_row(bar, row)
            checkpoints.append_metrics(args.out_dir, row)
            checkpoints.write_samples(args, processor, step, samples, stats)
        reporter.log(row)
        if save:
            checkpoints.save_checkpoint(policy, processor, run.optimizer, step, stream, args, row, ranks)
        if stopping and not last:
            break
    bar.close()
    reporter.close()
    if ranks.master:
        checkpoints.say_done(args, step, row, stopping and not run.finished(step, args), stop)


def cli(argv):
    """The command line: main(), with the errors a user can fix said in one line, no traceback."""
    try:
        main(argv)
    except dataset.BadRowError as e:                 # the message names the file, the row and the fix
        sys.exit(f"error: {e}")
    except RuntimeError as e:                        # a collective that timed out names its phase
        if parallel.timed_out(e) is None:
            raise
        sys.exit(f"error: {parallel.timed_out(e)}")


if __name__ == "__main__":
    cli(sys.argv[1:])
