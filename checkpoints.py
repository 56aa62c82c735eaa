"""
The record of a run: atomic checkpoints, resume and the damage rules, metrics.jsonl,
--report_to, and SIGTERM / Ctrl-C as "save and stop". Skip it on a first read.

    ---- checkpoints ----  save_checkpoint writes a temp folder, renames it, then points
                           `latest` at it; resume_point finds the newest complete one,
                           whatever `latest` says; start_or_resume refuses anything that
                           could overwrite an earlier run
    ---- run services ---- the log cut back to a resumed step, TensorBoard / W&B, StopSignal

A checkpoint is a plain save_pretrained folder (transformers and vLLM load it as it is)
plus training_state.pt, vgpo_config.json and, under --fsdp, optimizer/ written sharded.
"""

import errno
import json
import math
import os
import random
import shutil
import signal
import threading
import zipfile

import torch
import torch.distributed as dist

import parallel
import rollout
from models import GiB, safetensors_problem

# -----------------------------------------------------------------------------
# ---- checkpoints ----: atomic writes, what counts as complete, where to resume

def checkpoint_dir(out_dir):
    # step_XXXXXX/ folders and the `latest` file live here, apart from the run's logs
    return os.path.join(out_dir, "checkpoints")


def latest_checkpoint(out_dir):
    """The newest complete checkpoint of a run folder, or None (see resume_point)."""
    return resume_point(out_dir)[0]


def checkpoint_problem(path):
    """None if `path` holds a complete checkpoint as save_checkpoint writes it, else the
    first thing missing or damaged. Cheap: no tensor is loaded."""
    for name in ("config.json", "vgpo_config.json", "training_state.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"no {name}"
    # torch.save writes a zip archive, whose directory is at the very end of the file
    if not zipfile.is_zipfile(os.path.join(path, "training_state.pt")):
        return "training_state.pt is truncated or damaged"
    # a large model is written as several shards: every one of them must be whole
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not shards:
        return "no model weights (*.safetensors)"
    for shard in shards:
        problem = safetensors_problem(os.path.join(path, shard))
        if problem:
            return f"{shard} is {problem}"
    # under FSDP the optimizer state is written apart, and its .metadata file comes last
    with open(os.path.join(path, "vgpo_config.json")) as f:
        fsdp = json.load(f).get("fsdp", False)
    if fsdp and not os.path.isfile(os.path.join(path, "optimizer", ".metadata")):
        return "no sharded optimizer state (optimizer/.metadata)"
    return None


def resume_point(out_dir):
    """(the newest complete checkpoint or None, [notes on newer ones that were passed over]).

    The newest complete step_* folder wins, whatever `latest` says: `latest` is written
    last, so a crash after a checkpoint's rename leaves it one behind, and deleting the
    newest folder (to roll back) leaves it dangling. Damaged folders are named in the notes.
    """
    root = checkpoint_dir(out_dir)
    if not os.path.isdir(root):
        return None, []
    notes = []
    # zero-padded step numbers sort as numbers: newest first
    for name in sorted((d for d in os.listdir(root) if d.startswith("step_")), reverse=True):
        problem = checkpoint_problem(os.path.join(root, name))
        if problem is None:
            return os.path.join(root, name), notes
        notes.append(f"{os.path.join(root, name)} is incomplete: {problem}")
    return None, notes


def no_space(root, name, needed):
    # what the user needs to know: nothing was lost, how much room to make, how to go on
    previous = latest_checkpoint(os.path.dirname(root))
    raise SystemExit(f"no space left on {root}: checkpoint {name} needs about {needed / GiB:.2f} GiB and "
                     f"{shutil.disk_usage(root).free / GiB:.2f} GiB are free. It was not written; "
                     f"{previous or 'no earlier checkpoint'} and `latest` are intact. Free some space (or "
                     f"pass --keep_last N), then continue with --resume.")


def write_checkpoint_files(tmp, policy, processor, optimizer, weights, step, stream, args, last_metrics):
    """Rank 0's part of a checkpoint, written into the temp folder `tmp`."""
    # a temp folder left by an earlier crash at this very step is never mixed into this one
    shutil.rmtree(tmp, ignore_errors=True)
    # weights=None: save_pretrained reads the model's own state dict (the data-parallel path)
    policy.model.save_pretrained(tmp, state_dict=weights)
    processor.save_pretrained(tmp)
    state = {"step": step, "data_position": stream.position, "fsdp": args.fsdp,
             # for inspection: exact resume comes from re-seeding every step by (seed, rank, step)
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
             "last_metrics": last_metrics}
    # under FSDP every rank writes its own optimizer shards (optimizer/, see save_checkpoint)
    if not args.fsdp:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, os.path.join(tmp, "training_state.pt"))
    # the flags of the run, which --resume compares with its own (config.check_same_run)
    with open(os.path.join(tmp, "vgpo_config.json"), "w") as f:
        json.dump(vars(args), f, indent=2)


def save_checkpoint(policy, processor, optimizer, step, stream, args, last_metrics, ranks):
    """Write checkpoints/step_XXXXXX atomically (temp dir, then rename), then point
    `latest` at it (temp file, then replace): a crash leaves the previous one intact.

    Every rank calls this. The folder is a plain save_pretrained checkpoint (transformers
    and vLLM load it as it is) plus training_state.pt. Under FSDP the full weights are
    gathered to rank 0 first, and the optimizer state is written sharded, each rank its
    part, to optimizer/ (torch.distributed.checkpoint; it can be resumed on any number
    of ranks). All ranks must see the same --out_dir (a shared filesystem on 2+ nodes).
    """
    parallel.entering(f"checkpoint of step {step}")
    master = ranks.master
    root = checkpoint_dir(args.out_dir)
    name = f"step_{step:06d}"
    tmp, final = os.path.join(root, f".tmp_{name}"), os.path.join(root, name)
    os.makedirs(root, exist_ok=True)
    # fp32 weights and AdamW's two fp32 moments: about 12 bytes a parameter. Checked on
    # every rank and agreed on, so that all stop together instead of waiting on a barrier.
    needed = 12 * sum(p.numel() for p in policy.parameters()) * 1.05
    short = ranks.max_named({"short": shutil.disk_usage(root).free < needed})
    if short["short"]:
        no_space(root, name, needed)
    weights = None
    if args.fsdp:
        # a collective: every rank sends its shards, rank 0 receives the full tensors on its CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(policy, options=options)
        # the Policy wrapper's prefix: the folder holds the transformers model's own key names
        weights = {k.removeprefix("model."): v for k, v in weights.items()}   # on rank 0 only
    if master:
        try:
            write_checkpoint_files(tmp, policy, processor, optimizer, weights, step, stream, args,
                                   last_metrics)
        except (OSError, RuntimeError) as e:             # torch reports a full disk as "unexpected pos"
            # the estimate above can be short (other writers, a quota): the half-written folder goes
            shutil.rmtree(tmp, ignore_errors=True)
            message = str(e)
            full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in message
            if full or "No space" in message:
                no_space(root, name, needed)
            raise
    if args.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        dist.barrier()                                   # tmp exists
        optimizer_state = get_optimizer_state_dict(policy, optimizer)      # this rank's shards
        dcp.save(optimizer_state, checkpoint_id=os.path.join(tmp, "optimizer"))
        dist.barrier()                                   # every shard is written
    if master:
        # a folder of this step can only be one that a resume passed over as incomplete
        if os.path.exists(final):
            shutil.rmtree(final)
        # a rename within one filesystem is atomic: the folder is there whole, or not at all
        os.rename(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        # older checkpoints go only after the new one is complete and named
        if args.keep_last > 0:
            old = sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-args.keep_last]
            for d in old:
                shutil.rmtree(os.path.join(root, d))
    # no rank goes on (and might stop) before the checkpoint is complete
    if ranks.world > 1:
        dist.barrier()
    return final


def load_optimizer(policy, optimizer, path, args):
    """The optimizer state of checkpoint `path` (written as save_checkpoint writes it)."""
    # weights_only: a checkpoint folder is data, never code to run
    state = torch.load(os.path.join(path, "training_state.pt"), weights_only=True)
    if args.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        template = get_optimizer_state_dict(policy, optimizer)   # this rank's shards, to be filled
        # each rank reads the parts of its shards, whatever the world size that wrote them
        dcp.load(template, checkpoint_id=os.path.join(path, "optimizer"))
        set_optimizer_state_dict(policy, optimizer, template)
    else:
        optimizer.load_state_dict(state["optimizer"])
    return state


def parse_log_line(line):
    """A metrics.jsonl line as a dict; None for a blank line or one cut off by a crash."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def saved_config(path):
    """The flags a checkpoint was written with (its vgpo_config.json)."""
    with open(os.path.join(path, "vgpo_config.json")) as f:
        return json.load(f)


def start_or_resume(args, master):
    """The checkpoint to resume from, or None for a fresh run. Refuses whatever could
    overwrite an earlier run's checkpoints or log; clears a crashed save's temp folder."""
    root = checkpoint_dir(args.out_dir)
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    metrics = os.path.join(args.out_dir, "metrics.jsonl")
    # a run is there if it left checkpoints or a log: either would be overwritten by a new one
    has_log = os.path.isfile(metrics) and os.path.getsize(metrics) > 0
    if not args.resume:
        if steps or has_log:
            raise SystemExit(f"{args.out_dir} already holds a run ({len(steps)} checkpoints, metrics.jsonl); "
                             f"pass --resume to continue it or choose another --out_dir (nothing is "
                             f"overwritten)")
        return None
    resume_from, notes = resume_point(args.out_dir)
    if resume_from is None and (steps or has_log):
        found = "\n  ".join(notes) or "no checkpoint was written yet"
        raise SystemExit(f"--resume: {args.out_dir} holds a run but no complete checkpoint:\n  {found}\n"
                         f"Nothing was changed. Restore a checkpoint, or move {args.out_dir} away to start "
                         f"afresh.")
    # rank 0 alone cleans up; the other ranks read the same folder and reach the same answer
    if master:
        for note in notes:
            print(f"warning: {note}; passed over")
        stale = [d for d in os.listdir(root) if d.startswith(".tmp_") or d == "latest.tmp"] \
            if os.path.isdir(root) else []
        for name in stale:                       # a save that crashed half-way: never a checkpoint
            print(f"removing {os.path.join(root, name)}, left by a save that did not finish")
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if resume_from is None:
            print(f"--resume: nothing to resume in {args.out_dir}; starting a new run")
        elif notes:
            print(f"resuming from {resume_from}, the newest complete checkpoint")
    return resume_from


# -----------------------------------------------------------------------------
# ---- run services ----: the log, metrics to TensorBoard / W&B, stopping on a signal

def start_log_files(args, start_step):
    """config.json, and metrics.jsonl cut back to the checkpoint's step: a resumed run
    redoes the steps after its checkpoint, so their old lines (and a line cut off by a
    crash) are dropped, and the log reads as if the run had never stopped."""
    os.makedirs(args.out_dir, exist_ok=True)
    # the flags as this process runs them (a resumed run may have been allowed a change)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    path = os.path.join(args.out_dir, "metrics.jsonl")
    if os.path.exists(path):
        # the lines up to the checkpoint's step are kept as they are: they are that run's past
        with open(path) as f:
            lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f
                     if (row := parse_log_line(ln)) is not None and row["step"] <= start_step]
        with open(path, "w") as f:
            f.writelines(lines)


def print_start(args, ranks, run, n_params, attention, units, resume_from):
    """The start-up lines: the model and how it is held, the data, the sampling, the flags."""
    # how the weights are held decides the memory per rank: say it before the first step
    sharding = f"FSDP2 over {ranks.world} ranks, {units} units + root" if args.fsdp else "full copy per rank"
    if args.fsdp and parallel.mesh_shape(run.policy):
        nodes, per_node = parallel.mesh_shape(run.policy)
        sharding += f", HSDP: sharded over {per_node} ranks a node, replicated over {nodes} nodes"
    sharding += ", CPU offload" if args.fsdp_offload else ""
    # attention names the kernel in use (flash-attn or sdpa) and the vision rewiring on top of it
    print(f"model {args.model} ({n_params / 1e6:.2f}M params, attention: {attention}, "
          f"device: {ranks.device}, world: {ranks.world}, weights: {sharding})")
    print(f"train {args.train_data} ({len(run.train_data)} rows), val {args.val_data} ({len(run.val_data)}); "
          f"VGPO intra={args.intra} inter={args.inter} compensation={args.compensation} gate={args.gate}"
          + (f"; resuming from {resume_from}" if resume_from else ""))
    # what generate() really does: nothing is inherited from the checkpoint's generation_config
    print(f"sampling: {rollout.describe_sampling(args.temperature, args.top_p)}; validation: "
          f"{rollout.describe_sampling(0, 1.0)}; {args.max_new_tokens} new tokens at most")
    # one line, so that a job's stdout alone says how it was run
    print("config: " + json.dumps(vars(args)))


def print_row(bar, row):
    """The step's line on the console (every number is also in metrics.jsonl)."""
    # bar.write prints above the progress bar instead of breaking it
    bar.write(f"step {row['step']:4d} | epoch {row['epoch']:.2f} | reward {row['reward']:.3f} | "
              f"len {row['response_len']:.1f} | groups kept {row['kept_groups']}/{row['sampled_groups']} | "
              f"loss {row.get('loss', float('nan')):+.4f} | "
              + (f"val_acc {row['val_acc']:.3f} | " if "val_acc" in row else "")
              + (f"late/early focus {row['val_focus_ratio']:.2f} | " if "val_focus_ratio" in row else "")
              + ("steps " + "/".join(f"{a:.2f}" for a in row["val_step_acc"]) + " | "
                 if "val_step_acc" in row else "")
              + f"{row['time']:.1f}s | {row['peak_mem_gb']:.2f} GB")
    if row.get("replica_divergence", 0) > 0:         # every rank applied the same gradient: a bug
        bar.write(f"WARNING: ranks disagree on the weights by {row['replica_divergence']:.3g}")


def log_row(step, stream, n_rows, counts, tries, bad_rows, update, skipped, lr):
    """The step's metrics, from counts already summed over ranks. `reward` is the mean
    reward of the responses sampled: the accuracy unless --reward replaces it."""
    n = max(counts["responses"], 1)
    row = dict(step=step, epoch=stream.position / n_rows, data_position=stream.position,
               reward=counts["reward_sum"] / n, response_len=counts["len_sum"] / n,
               truncated=counts["truncated"] / n, sampled_groups=int(counts["sampled_groups"]),
               kept_groups=int(counts["kept_groups"]), zero_std_groups=int(counts["zero_std_groups"]),
               tries=tries, bad_rows=bad_rows, long_prompts=int(counts["long_prompts"]),
               updates=update["updates"], skipped_updates=skipped, lr=lr,
               # the share of decode row-steps paid for rows that had already finished: a row
               # stays in its generate() call until its --decode_segment ends (decode.row_steps)
               decode_idle=1 - counts["len_sum"] / counts["row_steps"] if counts["row_steps"] else 0.0)
    if update["updates"]:                            # means over the step's optimizer steps
        row.update({k: v / update["updates"] for k, v in update.items() if k != "updates"})
    return row


# ---- the VGPO columns of the log ----: ψ, α, the gate and focus, summed over ranks

def vgpo_stats(stats, mask, focus, ranks):
    """ψ / α / gate summaries and early / late visual focus for the log, over all ranks.

    Focus is rollout.focus_profile's, the definition eval.py uses too: each response's
    mean focus over the first and the last third of its tokens, averaged over responses.
    Called on every rank, with an empty rollout too (its sums are zero): the all-reduce
    must run everywhere. When no rank kept a group there is nothing to report.
    """
    valid = mask.float()                                         # (N, T)
    thirds = rollout.focus_profile(focus, mask)                  # (N, 3): early, middle, late
    early, late = thirds[:, 0], thirds[:, 2]                     # (N,) each, nan if no such token
    total = ranks.sum_named(dict(
        psi=(stats["psi"] * valid).sum(), psi_sq=((stats["psi"] - 1) ** 2 * valid).sum(), tokens=valid.sum(),
        alpha=stats["alpha"].sum(), alpha_sq=((stats["alpha"] - 1) ** 2).sum(), responses=len(stats["alpha"]),
        early=early.nansum(), n_early=(~early.isnan()).sum(),
        late=late.nansum(), n_late=(~late.isnan()).sum(),
        gate=(stats["gate"].float() * valid).sum()))
    if total["tokens"] == 0:
        return {}
    tokens, responses = total["tokens"], total["responses"]
    return dict(psi_mean=total["psi"] / tokens, psi_std=math.sqrt(total["psi_sq"] / tokens),
                alpha_mean=total["alpha"] / responses, alpha_std=math.sqrt(total["alpha_sq"] / responses),
                focus_early=total["early"] / max(total["n_early"], 1),
                focus_late=total["late"] / max(total["n_late"], 1), gate_frac=total["gate"] / tokens)


def write_samples(args, processor, step, samples, stats, n=4):
    """samples.jsonl: a few responses of this step, with reward, GRPO advantage Â, α and the
    mean token advantage, because RL is debugged by reading what the model wrote."""
    if len(samples) == 0:
        return
    rows = torch.arange(min(n, len(samples)))
    pad_id = processor.tokenizer.pad_token_id
    texts = processor.batch_decode(torch.where(samples.mask[rows], samples.responses[rows], pad_id),
                                   skip_special_tokens=True)
    mask = samples.mask[rows].float()
    with open(os.path.join(args.out_dir, "samples.jsonl"), "a") as f:
        for k, text in zip(rows.tolist(), texts):
            f.write(json.dumps(dict(
                step=step, group=int(samples.group_ids[k]), response=text, reward=float(samples.reward[k]),
                grpo_advantage=float(stats["grpo"][k]), alpha=float(stats["alpha"][k]),
                token_advantage_mean=float((samples.adv[k] * mask[k]).sum() / mask[k].sum()))) + "\n")


def format_metrics(values):
    """{"val_acc": 0.4, "val_step_acc": [0.9, 0.5, 0.6]} -> "val_acc 0.400, val_step_acc 0.90/0.50/0.60"."""
    return ", ".join(f"{k} " + ("/".join(f"{x:.2f}" for x in v) if isinstance(v, list) else f"{v:.3f}")
                     for k, v in values.items())


def append_metrics(out_dir, row):
    """One line of metrics.jsonl: written before the step's checkpoint, so that a resume,
    which drops the lines after its step, never keeps a line without its checkpoint's past."""
    # one whole line per write: a crash cuts at most the last line, which a resume drops
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def stopped_in_set_up(ranks, stop, out_dir):
    """True, on every rank alike, when SIGTERM or Ctrl-C came during set-up (the warm start,
    loading, the data checks), before the first step: there is nothing to save yet, so the
    run stops now rather than after a first step that may take an hour. Says what is kept."""
    # one all-reduce, so that every rank stops, or none: the others would wait in a collective
    if not ranks.max_named(dict(stop=stop.received is not None))["stop"]:
        return False
    if ranks.master:
        latest = latest_checkpoint(out_dir)
        # a cut warm start is not kept either (tiny.warm_start): the same command starts over
        kept = f"{latest} is unchanged: continue with --resume" if latest else "run the same command to start"
        print(f"stopped by {stop.received or 'a signal to another rank'} before the first step: nothing was "
              f"trained or saved; {kept}")
    return True


def say_done(args, step, row, stopped, stop):
    """The last line: where the run ended, and how to continue a stopped one."""
    final = latest_checkpoint(args.out_dir)
    if stopped:
        print(f"stopped by {stop.received or 'a signal to another rank'} after step {step}; the checkpoint "
              f"{final} is saved: continue with --resume")
    # a stopped run's last row may have no validation: say only what is known
    val = row.get("val_acc")
    focus = f", late/early focus {row['val_focus_ratio']:.2f}" if "val_focus_ratio" in row else ""
    print(f"done: {step} steps, {row['epoch']:.2f} epochs, final val_acc {val:.3f}{focus}, checkpoint {final}"
          if val is not None and not stopped else f"done: {step} steps, checkpoint {final}")


class Reporter:
    """--report_to: each step's metrics also go to TensorBoard or Weights & Biases, on
    rank 0. Neither is required: it is imported only when asked for, and metrics.jsonl
    stays the record that resume and eval.py read."""

    def __init__(self, args, master):
        # rank 0 only: every rank holds the same all-reduced row, and one copy is enough
        self.kind = args.report_to if master else "none"
        if self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("--report_to tensorboard needs the tensorboard package: "
                                 "pip install tensorboard") from None
            self.writer = SummaryWriter(os.path.join(args.out_dir, "tensorboard"))
        elif self.kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise SystemExit("--report_to wandb needs the wandb package: pip install wandb") from None
            # the run is named after its folder, so W&B and the disk say the same name
            name = os.path.basename(os.path.abspath(args.out_dir))
            self.run = wandb.init(project=args.wandb_project, name=name, dir=args.out_dir, config=vars(args))

    def log(self, row):
        # scalars only: both services plot numbers, and the step is the x axis, not a curve
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        # a list in chain order (val_step_acc) becomes one curve per step: val_step_acc_0, _1, ...
        numbers.update({f"{k}_{i}": x for k, v in row.items() if isinstance(v, list)
                        for i, x in enumerate(v)})
        if self.kind == "tensorboard":
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, row["step"])
            self.writer.flush()                         # a step's figures show while the next one runs
        elif self.kind == "wandb":
            self.run.log(numbers, step=row["step"])

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.run.finish()


class StopSignal:
    """SIGTERM (what clusters send before they kill a job) and SIGINT (Ctrl-C) ask the run
    to stop: the current step finishes, a checkpoint is saved, and the process exits 0.
    A second Ctrl-C stops at once. Under torchrun, SIGTERM reaches every rank; the ranks
    agree on stopping in the step's last all-reduce, so they all save the same step.
    """

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        # Python lets only the main thread install handlers (train.main may run in a thread)
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        # the second Ctrl-C: the user does not want to wait for the step to finish
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        # only noted here; the loop reads it after the step, where stopping is safe
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        # the handlers of before: a caller (a test, a notebook) gets its own Ctrl-C back
        for s, handler in self.previous.items():
            signal.signal(s, handler)