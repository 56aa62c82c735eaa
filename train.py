"""
Train a vision-language model with VGPO (or plain DAPO/GRPO) on verifiable rewards.

    python train.py                                   # tiny Qwen2.5-VL, synthetic task, CPU
    python train.py --no_vgpo                         # the same with plain DAPO (ablation)
    torchrun --nproc_per_node 2 train.py              # 2 processes (gloo on CPU, NCCL on GPU)
    python smoke.py                                   # on a GPU machine, first: the 7B path on a toy model
    torchrun --nproc_per_node 8 train.py --preset paper7b     # the paper's 7B recipe, 1 node (FSDP2)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr node0 --master_port 29500 \
        train.py --preset paper7b --out_dir /shared/vgpo7b   # 2 nodes; --node_rank 1 on the other
    python train.py --out_dir out --resume            # continue from out/checkpoints/latest

With no arguments it builds a tiny Qwen2.5-VL, warm-starts it on a synthetic task whose
answers reason step by step about the image ("\\boxed{r2g1b3}": red, green, blue
squares counted in turn; tiny.py), then trains it with VGPO, in about 6 minutes on a
laptop CPU; --task count is the one-digit counting task. The same code trains a hub
model: --model Qwen/Qwen2.5-VL-7B-Instruct --train_data <id or local file>.
Every flag, with the paper's symbol and value, is in config.py (and --help); processes,
checkpoints and the start-up checks are in infra.py, so that this file is the algorithm.

How one step differs from textbook GRPO, in order:
 1. Rollout: each rank samples n responses for its share of prompts; groups whose
    responses are all right or all wrong are dropped and more prompts are sampled, up to
    --max_tries times (DAPO dynamic sampling). Over-long prompts are dropped, never cut.
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
    weights gathered once (see infra.full_weights); ranks with fewer micro-batches run a
    zero-loss one (see update_policy). Checkpoints stay plain save_pretrained folders.
"""

import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

import config
import infra
import rollout
import vgpo

# -----------------------------------------------------------------------------
# rollout: sample, reward, filter


def rewards(texts, golds, args):
    """One reward per response: the paper's accuracy, or the --reward module:function.

    Example: --reward my_rewards:length_penalty imports my_rewards.py (from the working
    folder or PYTHONPATH) and calls length_penalty(texts, golds) -> [float, ...].
    """
    # accuracy only, as the paper trains: no format reward, no length penalty
    if args.reward == "accuracy":
        return rollout.accuracy_rewards(texts, golds, args.bare_answers)
    return rollout.custom_rewards(args.reward, texts, golds)


def lr_at(step, total_steps, args):
    """The learning rate of training step `step` (0-based): --warmup_steps of linear
    warm-up, then constant (the paper) or a linear / cosine decay towards 0 at `total_steps`.
    A function of the step alone, so a resumed run gets exactly the same rates.
    Example: lr 1e-6, warm-up 2, cosine over 6 steps -> 5e-7, 1e-6, 1e-6, 8.5e-7, 5e-7, 1.5e-7.
    """
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    if args.lr_schedule == "linear":
        return args.lr * (1 - progress)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def fetch_examples(data, indices, args, counters, first_group=0):
    """Examples for `indices`; with --skip_bad_rows a bad row is counted and skipped.

    Each example's "group" id is its position in the prompt stream (first_group + k):
    unique across epochs, unlike the row index, so two draws of one row never merge.
    """
    examples = []
    for k, i in enumerate(indices):
        try:
            ex = data[i]
        except rollout.BadRowError as e:
            if not args.skip_bad_rows:
                raise
            counters["bad_rows"] += 1
            if len(data.skipped) < 5:
                data.skipped.append(str(e))
            continue
        ex["group"], ex["row"] = first_group + k, i
        examples.append(ex)
    return examples


def encode_examples(processor, examples, args, counters, data):
    """Process prompts once, then drop over-long ones (never cut them) and, under --fsdp,
    text-only ones. Returns the batch, its images per row (B,) and the examples kept."""
    # pixel_values holds every image's patches, in row order; ipr says how many are whose
    batch, ipr = rollout.encode_prompts(processor, examples, args.instruction)
    fits = batch["attention_mask"].sum(dim=1) <= args.max_prompt_len              # (B,)
    counters["long_prompts"] += int((~fits).sum())
    if args.fsdp and (ipr == 0).any():
        # every rank must run the sharded vision tower in every update forward
        row = examples[int((ipr == 0).nonzero()[0])]["row"]
        if not args.skip_bad_rows:
            raise SystemExit(f"{args.train_data}: row {row} has no image; under --fsdp every training "
                             f"prompt needs one (the vision blocks are sharded, and every rank must run "
                             f"them in each forward). Drop text-only rows, pass --skip_bad_rows to skip "
                             f"and count them, or train without --fsdp.")
        counters["bad_rows"] += int(((ipr == 0) & fits).sum())
        if len(data.skipped) < 5:
            data.skipped.append(f"{args.train_data}, row {row}: no image (needed under --fsdp)")
        fits &= ipr > 0
    if not fits.any():
        return batch, ipr, []
    if not fits.all():
        batch, ipr = rollout.take_rows(batch, ipr, fits.nonzero().flatten())
        examples = [ex for ex, ok in zip(examples, fits.tolist()) if ok]
    return batch, ipr, examples


def sample(policy, processor, batch, ipr, rows, args, device):
    """Sample one response for each of `rows` (prompt indices, G per prompt) at the
    training temperature, --gen_batch sequences per generate() call (the KV cache's size).
    Returns responses (n, T), their masks (n, T) and which hit --max_new_tokens (n,)."""
    responses, masks, truncs = [], [], []
    policy.eval()
    for chunk in rows.split(args.gen_batch):
        gen_batch, _ = rollout.take_rows(batch, ipr, chunk)
        with rollout.autocast(device):
            # sampling settings are explicit, never the checkpoint's generation_config (rollout.py)
            r, m, t = policy(rollout.generate, processor, rollout.to_device(gen_batch, device),
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, cache=args.decode_cache)
        responses.append(r.cpu()), masks.append(m.cpu()), truncs.append(t.cpu())
    # chunks end at different lengths: right-pad them to one width
    pad_id = processor.tokenizer.pad_token_id
    return rollout.pad_right(responses, pad_id), rollout.pad_right(masks, False), torch.cat(truncs)


def collect_rollouts(policy, processor, data, stream, args, rank, world, device, counters):
    """DAPO dynamic sampling on this rank: sample groups until this rank holds its share
    of informative groups (or --max_tries rounds have run). Every rank runs the same
    number of rounds and draws from the shared stream, so no prompt is used twice.
    """
    # This rank's part of the batch: whole groups only, so that every group's advantage
    # (Step 0) and VGPO's group-wise min-max (Steps 1, 5) need no communication.
    share = args.rollout_batch // world
    kept, n_kept, tries = [], 0, 0
    while tries < args.max_tries:
        tries += 1
        # Lock-step: every rank runs as many rounds as the rank that needs the most, because
        # each round draws from the shared stream (and generate() under FSDP is collective-free
        # only because the weights were gathered before). SUM > 0: some rank still needs groups.
        need = infra.all_reduce(torch.tensor([float(n_kept < share)]), world)
        if need.item() == 0:
            break
        # a group's id is its prompt's position in the stream: unique across epochs and ranks
        first_group = stream.position + rank * share
        indices = stream.take(share * world)[rank * share:(rank + 1) * share]
        if n_kept >= share:
            continue                                    # full: keep stepping with the others
        examples = fetch_examples(data, indices, args, counters, first_group)
        batch, ipr, examples = encode_examples(processor, examples, args, counters, data) if examples else (
            None, None, [])
        if not examples:
            continue
        rows = torch.arange(len(examples)).repeat_interleave(args.group_size)   # (n,): G rows per prompt
        responses, masks, truncated = sample(policy, processor, batch, ipr, rows, args, device)   # (n, T)
        texts = processor.batch_decode(torch.where(masks, responses, processor.tokenizer.pad_token_id),
                                       skip_special_tokens=True)
        # the verifiable reward: 1 if the last \boxed{} equals the gold answer, else 0 (no format term)
        acc = torch.tensor(rewards(texts, [examples[r]["answer"] for r in rows.tolist()], args))     # (n,)
        group_ids = torch.tensor([examples[r]["group"] for r in rows.tolist()])                    # (n,)
        # DAPO's online filter: a group whose rewards are all equal has zero advantage everywhere
        # and would only dilute the token mean; drop it and sample more prompts instead
        keep = rollout.informative_groups(acc, group_ids)                                          # (n,)
        counters["sampled_groups"] += len(examples)
        counters["zero_std_groups"] += len(examples) - int(keep.sum()) // args.group_size
        counters["reward_sum"] += float(acc.sum())
        counters["len_sum"] += float(masks.sum())
        counters["truncated"] += int(truncated.sum())
        counters["responses"] += len(rows)
        # keep whole informative groups, up to this rank's share; rows come G at a time, so
        # the first row of each group speaks for the group
        keep_prompts = keep.view(-1, args.group_size)[:, 0].nonzero().flatten()[:share - n_kept]
        keep_rows = (keep_prompts.unsqueeze(1) * args.group_size + torch.arange(args.group_size)).flatten()
        if len(keep_rows):
            prompts, row_ipr = rollout.take_rows(batch, ipr, rows[keep_rows])
            kept.append(rollout.Rollout(prompts, row_ipr, responses[keep_rows], masks[keep_rows],
                                        acc[keep_rows], group_ids[keep_rows]))
        n_kept += len(keep_prompts)
    counters["tries"] = tries
    return rollout.Rollout.concat(kept, processor.tokenizer.pad_token_id)


def vgpo_switches(args):
    """The flags of vgpo.vgpo_advantages: the ablation switches and Eq. 5-6's parameters."""
    return dict(intra=args.intra, inter=args.inter, compensation=args.compensation, gate=args.gate,
                beta=args.beta, kappa=args.kappa, gamma=args.gamma, schedule=args.schedule,
                start=args.comp_start, exponent=args.exponent, step_at=args.step_at)


def token_advantages(roll, focus, switches):
    """Step 3: vgpo.vgpo_advantages on this rank's groups (zero rows give zero tensors)."""
    # an empty rollout still yields tensors of the right shape, so the step's statistics
    # all-reduce runs on this rank too (ranks must call the same collectives)
    if len(roll) == 0:
        empty_rows, empty_tokens = torch.zeros(0), torch.zeros(roll.mask.shape)
        return empty_tokens, dict(psi=empty_tokens, alpha=empty_rows, gate=roll.mask.clone())
    has_image = roll.ipr > 0                      # (N,): prompts without an image get GRPO
    return vgpo.vgpo_advantages(roll.acc, roll.group_ids, focus, roll.mask, has_image, **switches)


@torch.no_grad()
def score_rollouts(policy, roll, args, device, focus=True):
    """The no-grad forward of step 2: old log-probs and visual focus for every row."""
    policy.eval()
    # Step 2's no-grad forward of the sampling policy (the PPO 'old' policy): its log-probs
    # are the ratio's denominator, and its last-layer states give the focus scores, so focus
    # comes from the policy that wrote the responses, not from one half-way through an update.
    logp = torch.zeros(roll.mask.shape)
    s = torch.zeros(roll.mask.shape)
    for rows in micro_batches(roll, torch.arange(len(roll)), args):
        prompts, responses, mask, width = roll.micro(rows, device)
        with rollout.autocast(device):
            lp, f = policy(rollout.score, prompts, responses, mask, temperature=args.temperature, focus=focus,
                           logp_chunk=args.logp_chunk)
        logp[rows, :width] = lp.float().cpu()
        if focus:
            s[rows, :width] = f.cpu()
    return logp, s


# -----------------------------------------------------------------------------
# update

def micro_batches(roll, rows, args):
    """Split rows into micro-batches: --micro_batch rows each, or, with --micro_tokens,
    as many rows as fit in that many padded tokens (prompt + response), in order.

    Example (micro_tokens 100): rows of 30, 30, 60 tokens -> [r0, r1] (2 x 30), [r2].
    Memory follows the padded size of a micro-batch, so a token budget packs many short
    responses together and keeps long ones alone. Gradients do not depend on the split.
    """
    if len(rows) == 0:
        return []
    if not args.micro_tokens:
        return list(rows.split(args.micro_batch))
    # each row's padded cost: its prompt plus its response, in tokens
    lengths = (roll.prompts["attention_mask"].sum(1) + roll.mask.sum(1))[rows].tolist()
    out, current, longest = [], [], 0
    for r, n in zip(rows.tolist(), lengths):
        if current and (len(current) + 1) * max(longest, n) > args.micro_tokens:
            out.append(torch.tensor(current))
            current, longest = [], 0
        current.append(r)
        longest = max(longest, n)
    return out + ([torch.tensor(current)] if current else [])


# what update_policy logs, each a sum over micro-batches and ranks of a token mean
LOGGED = ("loss", "clipfrac_upper", "clipfrac_lower", "clipfrac_dual", "approx_kl", "entropy", "kl",
          "grad_norm")


def update_policy(policy, optimizer, params, roll, args, world, device, with_kl=False, probe=None):
    """Step 4: PPO-style updates over the rollout batch, one optimizer step a mini-batch.

    The rollout's groups are split into rollout_batch / mini_batch mini-batches; each
    mini-batch's loss is the token mean over ALL its valid tokens on every rank (the
    count is all-reduced first), its gradient is summed over micro-batches and ranks,
    clipped, and applied unless it is not finite.
    Under FSDP every forward gathers weights and every backward reduces gradients, so all
    ranks must run as many of each: a rank with fewer micro-batches than the others runs
    `probe` (a one-row rollout) with its loss times 0 to make up the difference.
    Returns {name: sum over the optimizer steps} for the LOGGED metrics, plus "updates"
    (optimizer steps) and "skipped" (of those, skipped for a non-finite gradient).
    """
    policy.train()
    n_rows = len(roll)
    # Mini-batches split by whole groups: a group's responses are always updated together.
    group_rows = torch.arange(n_rows).view(-1, args.group_size)         # (groups, G)
    totals = dict.fromkeys(LOGGED, 0.0)              # summed over optimizer steps, then over ranks
    n_updates, skipped = 0, 0
    for _ in range(args.ppo_epochs):
        for mini in torch.tensor_split(group_rows, args.rollout_batch // args.mini_batch):
            rows = mini.flatten()
            # DAPO's token mean over the GLOBAL mini-batch: each micro-batch's loss is divided by
            # the count of every valid token on every rank, so that summing gradients over
            # micro-batches and ranks (never averaging) gives exactly the gradient of that mean,
            # whatever the micro-batch size or the number of ranks.
            # the token count of the whole global mini-batch: every rank divides by it
            mine = float(roll.mask[rows].sum()) if len(rows) else 0.0
            num_tokens = infra.all_reduce(torch.tensor(mine), world)
            if num_tokens.item() == 0:
                continue
            num_tokens = num_tokens.to(device)
            # micro-batches bound memory only; the gradient does not depend on them (tested)
            micros = micro_batches(roll, rows, args) if len(rows) else []
            padding = 0
            # FSDP: every forward gathers and every backward reduce-scatters, collectively, so a rank
            # with fewer micro-batches makes up the difference with zero-loss passes of the probe
            if probe is not None:
                most = infra.all_reduce(torch.tensor(len(micros)), world, op=dist.ReduceOp.MAX)
                padding = int(most) - len(micros)
            local = dict.fromkeys(LOGGED[:-1], 0.0)  # this rank's sums over its micro-batches
            for micro in micros:
                prompts, responses, mask, width = roll.micro(micro, device)
                with rollout.autocast(device):
                    # log π_θ of each sampled token at the sampling temperature: (n, width)
                    logp, _ = policy(rollout.score, prompts, responses, mask, temperature=args.temperature,
                                     logp_chunk=args.logp_chunk)
                # clipped surrogate with clip-higher and dual clip, weighted by A_{i,t} = Â_i α_i ψ_{i,t}
                loss, m = vgpo.policy_loss(logp, roll.old_logp[micro, :width].to(device),
                                           roll.adv[micro, :width].to(device), mask,
                                           clip_low=args.clip_low, clip_high=args.clip_high,
                                           clip_dual=args.clip_dual, num_tokens=num_tokens)
                # the paper trains without a KL term; with --kl_coef, k3 to the frozen starting model
                kl = torch.zeros((), device=device)
                if with_kl:
                    kl_tok = vgpo.kl_penalty(logp, roll.ref_logp[micro, :width].to(device), args.kl_kind)
                    kl = (kl_tok * mask).sum() / num_tokens
                    loss = loss + args.kl_coef * kl
                # gradients accumulate over micro-batches: the SUM the token mean above asks for
                loss.backward()
                for k, v in dict(m, loss=loss.detach(), kl=kl.detach()).items():
                    if k in local:
                        local[k] += float(v)
            if padding:
                prompts, responses, mask, _ = probe.micro(torch.arange(1), device)
            for _ in range(padding):
                with rollout.autocast(device):
                    logp, _ = policy(rollout.score, prompts, responses, mask, logp_chunk=args.logp_chunk)
                (logp.sum() * 0).backward()                 # same collectives, no gradient
            # Data parallel: SUM the gradients over ranks (see the token mean above); under FSDP the
            # backward already reduce-scattered them with the same SUM.
            if probe is None:
                infra.all_reduce_grads(params, world)          # under FSDP the backward has reduced them
            # clip the global norm (--grad_clip, paper 1.0); the norm also tells a NaN or inf apart
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            if hasattr(grad_norm, "full_tensor"):        # a DTensor under FSDP: the global norm
                grad_norm = grad_norm.full_tensor()
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1                             # a non-finite gradient never reaches the weights
            optimizer.zero_grad(set_to_none=True)
            # the logged numbers: each a token mean over the global mini-batch, summed over ranks
            for k, v in infra.all_reduce_named(local, world).items():
                totals[k] += v
            totals["grad_norm"] += float(grad_norm)
            n_updates += 1
    return dict(totals, updates=n_updates, skipped=skipped)


# -----------------------------------------------------------------------------
# validation

def validate(policy, processor, data, args, rank, world, device):
    """Greedy accuracy on the validation set, sharded over ranks (rollout.answer_greedily,
    the same scoring as eval.py's benchmarks), with the mean response length and, with
    --val_focus, the late / early visual focus of the answers (rollout.focus_profile)."""
    policy.eval()
    # every rank answers every world-th example; the sums are reduced over ranks at the end
    mine = list(range(rank, len(data), world))
    sums = dict(correct=0.0, total=len(mine), tokens=0.0, early=0.0, n_early=0.0, late=0.0, n_late=0.0)
    for start in range(0, len(mine), args.val_batch):
        examples = [data[i] for i in mine[start:start + args.val_batch]]
        records = rollout.answer_greedily(policy, processor, examples, args.instruction, device=device,
                                          max_new_tokens=args.val_max_new_tokens, bare=args.bare_answers,
                                          focus=args.val_focus)
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
    v = infra.all_reduce_named(sums, world)
    out = dict(val_acc=v["correct"] / max(v["total"], 1), val_len=v["tokens"] / max(v["total"], 1))
    if args.val_focus and v["n_early"] and v["n_late"]:
        # each response counts once (as in training's log and eval.py); the ratio of the means
        early, late = v["early"] / v["n_early"], v["late"] / v["n_late"]
        out.update(val_focus_early=early, val_focus_late=late,
                   val_focus_ratio=late / early if early > 0 else float("nan"))
    return out


# -----------------------------------------------------------------------------
# log: one row of named metrics a step, summed over ranks, and a few samples to read

def vgpo_stats(stats, mask, focus, world):
    """ψ / α / gate summaries and early / late visual focus for the log, over all ranks.

    Focus is rollout.focus_profile's, the definition eval.py uses too: each response's
    mean focus over the first and the last third of its tokens, averaged over responses.
    Called on every rank, with an empty rollout too (its sums are zero): the all-reduce
    must run everywhere. When no rank kept a group there is nothing to report.
    """
    m = mask.float()                                             # (N, T)
    thirds = rollout.focus_profile(focus, mask)                  # (N, 3): early, middle, late
    early, late = thirds[:, 0], thirds[:, 2]                     # (N,) each, nan if no such token
    v = infra.all_reduce_named(dict(
        psi=(stats["psi"] * m).sum(), psi_sq=((stats["psi"] - 1) ** 2 * m).sum(), tokens=m.sum(),
        alpha=stats["alpha"].sum(), alpha_sq=((stats["alpha"] - 1) ** 2).sum(), responses=len(stats["alpha"]),
        early=early.nansum(), n_early=(~early.isnan()).sum(),
        late=late.nansum(), n_late=(~late.isnan()).sum(),
        gate=(stats["gate"].float() * m).sum()), world)
    if v["tokens"] == 0:
        return {}
    return dict(psi_mean=v["psi"] / v["tokens"], psi_std=math.sqrt(v["psi_sq"] / v["tokens"]),
                alpha_mean=v["alpha"] / v["responses"], alpha_std=math.sqrt(v["alpha_sq"] / v["responses"]),
                focus_early=v["early"] / max(v["n_early"], 1), focus_late=v["late"] / max(v["n_late"], 1),
                gate_frac=v["gate"] / v["tokens"])


def step_row(args, s, step, counters, roll, stats, focus, update, lr):
    """The step's metrics row, every number reduced over ranks by name."""
    tries = counters.pop("tries")                    # the same on every rank: not summed
    counters["kept_groups"] = len(roll) // args.group_size
    c = infra.all_reduce_named(counters, s.world)
    s.totals["bad_rows"] += c["bad_rows"]
    infra.check_training_data(s.totals, c, s.train_data, args, s.world)   # stops on unusable data
    n = max(c["responses"], 1)
    row = dict(step=step, epoch=s.stream.position / len(s.train_data), data_position=s.stream.position,
               reward=c["reward_sum"] / n, acc=c["reward_sum"] / n, response_len=c["len_sum"] / n,
               truncated=c["truncated"] / n, sampled_groups=int(c["sampled_groups"]),
               kept_groups=int(c["kept_groups"]), zero_std_groups=int(c["zero_std_groups"]), tries=tries,
               bad_rows=int(c["bad_rows"]), long_prompts=int(c["long_prompts"]), updates=update["updates"],
               skipped_updates=s.skipped, lr=lr)
    if update["updates"]:                            # means over the step's optimizer steps
        row.update({k: v / update["updates"] for k, v in update.items() if k != "updates"})
    row.update(vgpo_stats(stats, roll.mask, focus, s.world))
    return row


def write_samples(args, s, step, roll, stats, n=4):
    """samples.jsonl: a few responses of this step, with reward, GRPO advantage Â, α and the
    mean token advantage, because RL is debugged by reading what the model wrote."""
    if not s.master or len(roll) == 0:
        return
    rows = torch.arange(min(n, len(roll)))
    pad_id = s.processor.tokenizer.pad_token_id
    texts = s.processor.batch_decode(torch.where(roll.mask[rows], roll.responses[rows], pad_id),
                                     skip_special_tokens=True)
    mask = roll.mask[rows].float()
    with open(os.path.join(args.out_dir, "samples.jsonl"), "a") as f:
        for k, text in zip(rows.tolist(), texts):
            f.write(json.dumps(dict(
                step=step, group=int(roll.group_ids[k]), response=text, reward=float(roll.acc[k]),
                grpo_advantage=float(stats["grpo"][k]), alpha=float(stats["alpha"][k]),
                token_advantage_mean=float((roll.adv[k] * mask[k]).sum() / mask[k].sum()))) + "\n")


# -----------------------------------------------------------------------------
# main: the loop

def parse_args(argv=None):
    return config.parse_args(argv, description=__doc__)


def main(argv=None):
    args = parse_args(argv)
    with infra.StopSignal() as stop:                 # SIGTERM / Ctrl-C: finish the step, save, stop
        s = infra.setup_run(args, config.check_same_run)
        if s is not None:
            train(args, s, stop)
    infra.teardown()


def train(args, s, stop):
    """rollout -> advantages -> update -> log & checkpoint, until the run is finished."""
    from tqdm import tqdm
    bar = tqdm(total=s.total_steps, initial=s.start_step, disable=not s.master, desc="train", unit="step",
               dynamic_ncols=True)
    reporter = infra.Reporter(args, s.master)
    step, row, stopping = s.start_step, {}, False
    # the starting policy's validation, once, so that the log shows what RL added to it
    start = {}
    if s.start_step == 0 and args.val_every:
        with infra.full_weights(s.policy):
            start = validate(s.policy, s.processor, s.val_data, args, s.rank, s.world, s.device)
        if s.master:
            bar.write("before training: " + ", ".join(f"{k} {v:.3f}" for k, v in start.items()))
    while not infra.finished(args, s, step):
        t0, drawn_before = time.time(), s.stream.position
        # every step re-seeds from (seed, rank, step): a resumed run samples exactly the same
        torch.manual_seed(args.seed * 1_000_003 + step * 1009 + s.rank)
        random.seed(args.seed * 1_000_003 + step * 1009 + s.rank)

        # ---- rollout ----
        # Every rank runs every line below, even with zero informative groups: the
        # gathers, all-reduces and FSDP collectives must be called the same on all ranks.
        counters = dict.fromkeys(("bad_rows", "long_prompts", "sampled_groups", "zero_std_groups",
                                  "reward_sum", "len_sum", "truncated", "responses"), 0.0)
        with infra.full_weights(s.policy):           # under FSDP: gathered once, no per-token gathers
            # generate() reads the policy's weights, or their bf16 copy (--sample_dtype)
            sampler = infra.sampling_weights(s)
            roll = collect_rollouts(sampler, s.processor, s.train_data, s.stream, args, s.rank, s.world,
                                    s.device, counters)
            old_logp, focus = score_rollouts(s.policy, roll, args, s.device)     # (N, T) each
        if s.ref_policy is not None:
            with infra.full_weights(s.ref_policy):
                roll.ref_logp, _ = score_rollouts(s.ref_policy, roll, args, s.device, focus=False)

        # ---- advantages ----
        adv, stats = token_advantages(roll, focus, vgpo_switches(args))       # (N, T): Â · α · ψ
        roll.old_logp, roll.adv = old_logp, adv

        # ---- update ----
        lr = lr_at(step, s.total_steps, args)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        update = update_policy(s.policy, s.optimizer, s.params, roll, args, s.world, s.device,
                               with_kl=s.ref_policy is not None, probe=s.probe)
        s.skipped += update.pop("skipped")
        step += 1

        # ---- log & checkpoint ----
        s.totals["drawn"] += s.stream.position - drawn_before
        row = step_row(args, s, step, counters, roll, stats, focus, update, lr)
        if step == 1:
            row.update({f"start_{k}": v for k, v in start.items()})     # step 0's validation
        last = infra.finished(args, s, step)
        if (args.val_every and step % args.val_every == 0) or last:
            with infra.full_weights(s.policy):
                row.update(validate(s.policy, s.processor, s.val_data, args, s.rank, s.world, s.device))
        row["time"] = time.time() - t0
        # one MAX over ranks: the largest peak memory, and whether any rank was asked to stop
        flags = infra.all_reduce_named(dict(peak=infra.peak_memory(s.device), stop=stop.received is not None),
                                       s.world, op=dist.ReduceOp.MAX)
        row["peak_mem_gb"], stopping = flags["peak"] / 2**30, flags["stop"] > 0
        save = (args.save_every and step % args.save_every == 0) or last or stopping
        if save and not args.fsdp:                   # under FSDP there is one copy, nothing to compare
            row["replica_divergence"] = infra.replica_divergence(s.params, s.world)
        bar.update(1)
        if s.master:                                 # the log line first: a resume drops lines after its step
            infra.print_row(bar, row)
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        write_samples(args, s, step, roll, stats)
        reporter.log(row)
        if save:
            infra.save_checkpoint(s.policy, s.processor, s.optimizer, step, s.stream, args, row, s.rank,
                                  s.world)
        if stopping and not last:
            break
    bar.close()
    reporter.close()
    if s.master:
        say_done(args, s, step, row, stopping and not infra.finished(args, s, step), stop)


def say_done(args, s, step, row, stopped, stop):
    final = infra.latest_checkpoint(args.out_dir)
    if stopped:
        print(f"stopped by {stop.received or 'a signal to another rank'} after step {step}; the checkpoint "
              f"{final} is saved: continue with --resume")
    val = row.get("val_acc")
    focus = f", late/early focus {row['val_focus_ratio']:.2f}" if "val_focus_ratio" in row else ""
    print(f"done: {step} steps, {row['epoch']:.2f} epochs, final val_acc {val:.3f}{focus}, checkpoint {final}"
          if val is not None and not stopped else f"done: {step} steps, checkpoint {final}")


if __name__ == "__main__":
    main(sys.argv[1:])
