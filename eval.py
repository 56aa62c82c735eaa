"""
Score a checkpoint the way the paper reports it, and show whether it keeps looking at the image.

    python eval.py --ckpt out                                   # its own validation task
    python eval.py --ckpt out --image_ablation blank            # ... and with blank images
    python eval.py --ckpt out --focus --plot focus.png          # visual-forgetting diagnostics
    python eval.py --ckpt out/vgpo7b --bench all                # the paper's benchmark table
    python eval.py --ckpt Qwen/Qwen2.5-VL-7B-Instruct out/vgpo7b --bench mathvista --focus --plot f.png
    torchrun --nproc_per_node 8 eval.py --ckpt out/vgpo7b --bench all   # sharded, same numbers

Protocol (the paper's, as Look-Back's script runs it): greedy decoding, up to 2048 new
tokens, the training instruction appended unless the question already carries one; the
answer is the last \\boxed{} of the response, graded by rollout.grade (string match,
mathruler, math-verify with the gold first, or the option letter, never a substring test).
A sample whose image cannot be opened is answered "" and counted wrong, and listed in the
report: it never leaves the denominator.

Outputs, per checkpoint, in --output_dir (default <checkpoint>/eval/): summary.json
({benchmark: {"n", "accuracy", ...}}) and predictions.jsonl (one object per sample).
"""

import argparse
import json
import math
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from PIL import Image

import benchmarks
import checkpoints
import config
import dataset
import models
import parallel
import rollout
import tiny

# every benchmark of the paper's table is one split of this dataset; only testmini is not
BINS = 20


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=config.HelpFormatter)
    # what to score; several checkpoints share one table and one plot (base vs trained, VGPO vs DAPO)
    p.add_argument("--ckpt", nargs="+", required=True,
                   help="train.py run folder or checkpoint, or a hub id / folder of a Qwen-VL model; "
                        "several = one curve each in --plot")
    # no --bench: a train.py checkpoint is scored on the task it validated on, no download needed
    p.add_argument("--bench", nargs="+", default=None,
                   help=f"{', '.join(benchmarks.BENCHMARKS)} or all; default: the checkpoint's own "
                        f"validation task (a base model beside a train.py checkpoint borrows its task)")
    # offline machines: the hub's layouts are read as they are, with no conversion step
    p.add_argument("--data_dir", default=None,
                   help="local copy of the benchmarks (offline): a PAPO_eval hub snapshot, PAPO-Eval's "
                        "data/papo + data/images, or split files; for mathvista_testmini, AI4Math/MathVista")
    p.add_argument("--data", nargs="+", default=[],
                   help="extra local .jsonl/.json/.parquet benchmarks (named after the file)")
    p.add_argument("--problem_key", default="problem",
                   help="question column of --data files, as in train.py")
    p.add_argument("--answer_key", default="answer", help="gold answer column of --data files")
    p.add_argument("--images_key", default="images",
                   help="image column of --data files: paths (relative to the file), bytes or PIL images")
    p.add_argument("--allow_outside_paths", action="store_true",
                   help="let image paths in a data file be absolute or lead out of its folder with ..")
    # the FIRST N, not a random N: two checkpoints scored with --limit see the same samples
    p.add_argument("--limit", type=int, default=0,
                   help="score only the first N samples of each benchmark (0 = all)")
    # how to score it (the paper's protocol by default); --batch bounds the KV cache: each of its
    # prompts keeps up to --max_new_tokens cached tokens
    p.add_argument("--batch", type=int, default=0,
                   help="at most this many prompts per greedy generate() call; 0 = 16 on a CPU, 256 on a "
                        "GPU, where each call holds only as many as the GPU's free memory fits at its "
                        "prompts' lengths")
    p.add_argument("--max_new_tokens", type=int, default=2048,
                   help="longest response (paper: 2048); a checkpoint's own task uses its validation length")
    # None, not "": an empty --instruction is a real choice (append nothing), None = the checkpoint's
    p.add_argument("--instruction", default=None,
                   help="appended to each question that has none; default: the training instruction")
    # Look-Back's script, which the paper's numbers come from, uses 262,144 to 1,000,000 pixels
    p.add_argument("--min_pixels", type=int, default=0,
                   help="resize images to at least this many pixels (0 = the checkpoint's processor)")
    p.add_argument("--max_pixels", type=int, default=0,
                   help="resize images to at most this many pixels (0 = the checkpoint's processor)")
    # diagnostics
    p.add_argument("--focus", action="store_true",
                   help="visual focus along each response: early/middle/late thirds, correct vs wrong")
    p.add_argument("--plot", default=None,
                   help="PNG of mean focus against relative position, one curve per --ckpt (implies --focus)")
    # a model that scores as well without the image is not reading it: the table's "drop" column
    p.add_argument("--image_ablation", choices=["blank", "noise"], default=None,
                   help="also score with every image replaced by a blank (or noise) image of the same size")
    # where and how
    p.add_argument("--output_dir", default=None,
                   help="for summary.json and predictions.jsonl (default: <checkpoint>/eval, or eval/<name>)")
    # auto: flash_attention_2 when importable on a GPU, else sdpa (models.pick_attention, as train.py)
    p.add_argument("--attn", default="auto", choices=["auto", "flash_attention_2", "sdpa", "eager"],
                   help="attention kernel")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")
    return p


# -----------------------------------------------------------------------------
# checkpoints, and the run's own validation set (the benchmarks are in benchmarks.py)

def resolve_checkpoint(path):
    """A run folder -> its latest checkpoint; a checkpoint or model folder -> itself;
    anything else must look like a hub id ("org/name")."""
    if os.path.isdir(path):
        # a run folder: its newest COMPLETE checkpoint, so a half-written last one is never scored
        latest = checkpoints.latest_checkpoint(path)
        if latest:
            return latest
        # a plain transformers folder (a checkpoint itself, or a downloaded base model)
        if os.path.exists(os.path.join(path, "config.json")):
            return path
        raise SystemExit(f"{path}: neither a model folder (no config.json) nor a train.py run "
                         f"(no checkpoints/latest)")
    # a path-like name that is not a folder is a typo, not a hub id: said here, before
    # from_pretrained would try the network with it
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise SystemExit(f"no checkpoint at {path}: give a train.py run folder, a checkpoint "
                         f"folder, or a hub id such as Qwen/Qwen2.5-VL-7B-Instruct")
    # "org/name" with no such local folder: a hub id; if it cannot be loaded, load_model says both
    return path


def training_config(ckpt):
    # only train.py checkpoints carry vgpo_config.json (the flags of their run); a hub model
    # has none, and None sends main to --bench or to another checkpoint's task
    path = os.path.join(ckpt, "vgpo_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return SimpleNamespace(**json.load(f))


def own_validation(cfg):
    """The validation set a train.py run used (the synthetic held-out set by default)."""
    # the same arguments as train.py's validation set (seed + 10_000, --val_size), so the
    # same examples in the same order
    data = dataset.open_data(cfg.val_data, cfg.val_split, cfg, seed_offset=10_000, size=cfg.val_size)
    samples = []
    for k in range(len(data)):
        ex = data[k]
        samples.append({"id": k, "question": ex["problem"], "answer": ex["answer"], "images": ex["images"]})
    return samples


# -----------------------------------------------------------------------------
# scoring

def ablate(image, mode, seed):
    """A blank (black) or uniform-noise image of the same size."""
    # the same size, so the processor makes the same number of image tokens: only the
    # content the model could read is taken away, not the prompt's shape
    if mode == "blank":
        return Image.new("RGB", image.size, (0, 0, 0))
    g = torch.Generator().manual_seed(seed)
    # (H, W, 3) uint8: PIL's size is (W, H)
    pixels = torch.randint(0, 256, (image.size[1], image.size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def prompt_text(question, instruction):
    """The user text sent: the question, plus the instruction unless it already has one."""
    # ("How many squares?", I) -> "How many squares? I"; a PAPO_eval question comes back as it is
    return question if not instruction or rollout.has_instruction(question) else f"{question} {instruction}"


@torch.no_grad()
def run_benchmark(policy, processor, samples, finder, args, instruction, bare, max_new_tokens, ablation,
                  rank, world, device, budget=None):
    """Greedy answers for this rank's shard of `samples`; returns one record per sample.

    A sample whose images cannot be opened, or whose <image> marks and images disagree,
    is answered "" and counted wrong with the reason in its record: it never leaves the
    denominator, and it never takes the rest of its batch down with it.
    """
    from tqdm import tqdm

    # every world-th sample: each rank answers a share, the records are gathered at the end
    mine = samples[rank::world]
    records = []
    for start in tqdm(range(0, len(mine), args.batch), disable=rank != 0, desc="eval", leave=False):
        batch_samples, examples, pending = mine[start:start + args.batch], [], []
        for smp in batch_samples:
            # one instruction per prompt: PAPO_eval's questions carry their own, nothing is appended
            prompt = prompt_text(smp["question"], instruction)
            # every field filled, failures included, so that predictions.jsonl has one shape;
            # the defaults are a wrong, empty answer
            rec = {"id": smp["id"], "question": smp["question"], "prompt": prompt, "gold": smp["answer"],
                   "image_ok": True, "response": "", "answer": None, "correct": False}
            # a bad row (placeholders and images disagree, text not UTF-8) is wrong, with its reason,
            # and stays in the denominator; passed to the processor it would fail the whole batch
            if "error" in smp:
                rec.update(bad_row=True, error=smp["error"])
                records.append(rec)
                continue
            try:
                images = [finder.open(v) for v in smp["images"]]
                if ablation:
                    # seeded by sample and image: the same noise whichever rank answers the
                    # sample and for every checkpoint, so that ablated scores compare
                    images = [ablate(im, ablation, smp["id"] * 31 + j) for j, im in enumerate(images)]
            except Exception as e:
                rec.update(image_ok=False, error=f"{type(e).__name__}: {e}")
                records.append(rec)                      # counted wrong, never dropped
                continue
            # appended together: answers come back in the order of examples, matched to pending
            examples.append({"problem": prompt, "images": images, "answer": smp["answer"]})
            pending.append(rec)
        # every sample of this batch failed: nothing to generate
        if not examples:
            continue
        # the instruction is already in each prompt (prompt_text), so none is added here;
        # greedy and graded exactly as train.py's validation
        # with --focus also each token's image dependence (a KL to a blank image's prediction)
        answers = rollout.answer_greedily(policy, processor, examples, "", max_new_tokens=max_new_tokens,
                                          bare=bare, device=device, focus=args.focus,
                                          dependence=args.focus, budget=budget)
        # the per-token tensors are popped: they stay out of predictions.jsonl (summarise uses them)
        for rec, answer in zip(pending, answers):
            focus = answer.pop("focus", None)                    # (T,): one score per response token
            dependence = answer.pop("dependence", None)          # (T,): KL(image || blank) per token
            tokens = answer.pop("tokens")
            rec.update(answer)
            if focus is not None:
                rec["_tokens"] = dict(ids=tokens, focus=focus.tolist(), dependence=dependence.tolist())
            if focus is not None:
                # the early / middle / late thirds and the curve, as training's log defines them;
                # (1, T): one response, every position valid (focus holds only its own tokens)
                mask = torch.ones(1, len(focus), dtype=torch.bool)
                rec["focus_thirds"] = rollout.focus_profile(focus[None], mask)[0].tolist()
                rec["focus_bins"] = rollout.focus_profile(focus[None], mask, BINS)[0].tolist()
            records.append(rec)
    if world > 1:
        gathered = [None] * world
        # CPU objects: the gloo half of the process group carries them, also on GPU machines
        dist.all_gather_object(gathered, records)
        # every rank now holds every record (only rank 0 writes them)
        records = [r for part in gathered for r in part]
    # by id: the order of a one-rank run, whatever the world size (samples[rank::world] interleaves)
    return sorted(records, key=lambda r: r["id"])


def check_images(name, samples, finder, first=16):
    """Open the images of the first samples before any generation: when most of them
    fail, the layout is wrong (e.g. the image zips were left behind), and the run stops
    with the fix instead of scoring every sample as wrong."""
    # a few samples are enough to tell a wrong layout (every image fails) from a few bad files
    checked = [s for s in samples if "error" not in s and s["images"]][:first]
    errors = []
    for smp in checked:
        # opened and thrown away: only whether they open matters here
        try:
            [finder.open(v) for v in smp["images"]]
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    # more than half failing is a layout problem; a few bad files are scored wrong and listed
    if checked and len(errors) > len(checked) / 2:
        raise SystemExit(f"benchmark {name}: {len(errors)} of {len(checked)} samples checked have images "
                         f"that cannot be opened (first: {errors[0]}).\n{benchmarks.PAPO_LAYOUT}.")


def check_failures(name, summary, records):
    """A benchmark where most samples failed (images that do not open, or bad rows) is an
    error, never a score."""
    # counted after the run too: a score made mostly of failures is no score
    failed = [r for r in records if not r["image_ok"] or r.get("bad_row")]
    if len(failed) > summary["n"] / 2:
        shown = "\n  ".join(f"sample {r['id']}: {r['error']}" for r in failed[:3])
        raise SystemExit(f"benchmark {name}: {summary['image_failures']} of {summary['n']} samples have "
                         f"images that cannot be opened and {summary['bad_rows']} are bad rows; "
                         f"the first:\n  {shown}\n"
                         f"{benchmarks.PAPO_LAYOUT}.")


def summarise(records, with_focus, tokenizer=None, looks=False):
    """accuracy over every sample (failed images included), and focus by correctness; with
    `looks` (a run of the look task) also its look figures (tiny.chain_metrics)."""
    # n counts every sample: failed images and bad rows are wrong answers, never dropped
    n = len(records)
    out = {"n": n, "accuracy": sum(r["correct"] for r in records) / max(n, 1),
           "image_failures": sum(not r["image_ok"] for r in records),
           "bad_rows": sum(r.get("bad_row", False) for r in records)}
    if with_focus:
        # by correctness, since the paper's claim is that wrong answers forget the image more;
        # a failed sample has no focus and is in neither group
        for label, group in (("correct", [r for r in records if r["correct"] and "focus_thirds" in r]),
                             ("wrong", [r for r in records if not r["correct"] and "focus_thirds" in r])):
            if not group:
                continue
            early, middle, late = (_nanmean([r["focus_thirds"][i] for r in group]) for i in range(3))
            # late minus early, not late / early: a difference of mean cosines is defined whatever
            # their sign, while the ratio explodes when the early mean is near 0 (nan if a third
            # is missing from every response of the group)
            out[f"focus_{label}"] = {"n": len(group), "early": early, "middle": middle, "late": late,
                                     "late_minus_early": late - early}
        # does focus measure what it claims? Its rank correlation, over every response token of the
        # benchmark, with how much the token's prediction depends on the image (rollout.image_dependence)
        tokens = [r["_tokens"] for r in records if "_tokens" in r]
        focus = torch.tensor([x for t in tokens for x in t["focus"]])
        dependence = torch.tensor([x for t in tokens for x in t["dependence"]])
        out["focus_dependence_spearman"] = rollout.rank_correlation(focus, dependence)
        out["mean_image_dependence"] = float(dependence.mean()) if len(dependence) else float("nan")
        out["scored_tokens"] = len(focus)
        # the colour and look tasks' chain: accuracy and focus at each step, late errors that copy
        # (tiny.py); on the look task also how often and how well its late steps look
        golds = [r["gold"] for r in records]
        if records and all(tiny.STEP.fullmatch(str(g)[:2]) and len(str(g)) == 6 for g in golds):
            chained = [dict(response=r["response"], tokens=r["_tokens"]["ids"],
                            focus=torch.tensor(r["_tokens"]["focus"])) for r in records if "_tokens" in r]
            sums = tiny.chain_sums(chained, [r["gold"] for r in records if "_tokens" in r], tokenizer)
            out.update(tiny.chain_metrics(sums, len(chained), prefix="", looks=looks))
    return out


def _nanmean(values):
    """Mean over the responses that have this third at all (short ones may not)."""
    # each response counts once, as in rollout.focus_profile and training's log
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def mean_curve(records):
    """Mean focus per relative-position bin over all responses that reach the bin."""
    # bins a response does not reach (a 2-token response has 2 of 20) are nan: skipped
    total, count = [0.0] * BINS, [0] * BINS
    for r in records:
        for b, v in enumerate(r.get("focus_bins", [])):
            if not math.isnan(v):
                total[b] += v
                count[b] += 1
    return [t / c if c else float("nan") for t, c in zip(total, count)]


def plot_curves(curves, path):
    # imported only for --plot: scoring does not depend on matplotlib
    try:
        import matplotlib
        # Agg renders to a file with no display: GPU nodes are usually headless
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [(b + 0.5) / BINS for b in range(BINS)]        # the centre of each relative-position bin
    for label, curve in curves.items():
        # bins no response reached are nan: left out, so the line joins the bins that have data
        pts = [(xi, yi) for xi, yi in zip(x, curve) if not math.isnan(yi)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("relative position in the response (0 = first token, 1 = last)")
    ax.set_ylabel("mean visual focus  cos(h_t, v)")
    ax.set_title("Does the model keep looking at the image?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(table, args):
    ablation = args.image_ablation
    head = ["checkpoint", "benchmark", "n", "images failed", "bad rows", "accuracy %"]
    if ablation:
        # drop = accuracy lost without the image: how much the score needs the image at all
        head += [f"{ablation} images %", "drop"]
    if args.focus:
        head += ["focus early", "focus late", "late-early (correct)", "late-early (wrong)",
                 "focus~image dependence (Spearman)"]
    head += ["paper 7B VGPO %", "paper 7B DAPO %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ckpt, label, s in table:
        # a --data file or the own validation task has no paper figure: "-"
        paper = benchmarks.BENCHMARKS.get(label, (None, None, None, None))
        row = [ckpt, label, str(s["n"]), str(s["image_failures"]), str(s["bad_rows"]),
               f"{100 * s['accuracy']:.1f}"]
        if ablation:
            a = s[f"accuracy_{ablation}"]
            row += [f"{100 * a:.1f}", f"{100 * (s['accuracy'] - a):+.1f}"]
        if args.focus:
            # early / late over all responses: the correct and wrong groups, weighted by size
            groups = [s[k] for k in ("focus_correct", "focus_wrong") if k in s]
            n = sum(g["n"] for g in groups) or 1
            early = sum(g["early"] * g["n"] for g in groups) / n
            late = sum(g["late"] * g["n"] for g in groups) / n
            # late minus early of each group (summarise); "-" for an empty group or a nan one
            drift = lambda k: ("-" if k not in s or math.isnan(s[k]["late_minus_early"])
                               else f"{s[k]['late_minus_early']:+.3f}")
            rho = s.get("focus_dependence_spearman", float("nan"))
            row += [f"{early:.3f}", f"{late:.3f}", drift("focus_correct"), drift("focus_wrong"),
                    "-" if math.isnan(rho) else f"{rho:+.3f}"]
        row += [f"{paper[2]:.1f}" if paper[2] else "-", f"{paper[3]:.1f}" if paper[3] else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# main: each checkpoint in turn, then one table (and one plot) for all of them

def greedy_budget(model, args, device):
    """On a GPU: what the loaded weights leave of its memory sizes each greedy call, as many
    prompts as fit at their lengths, at most --batch (models.GenerationBudget). --focus
    scores prompt and answer again after it: a prompt token counts twice then, and each
    row carries the scoring forward's logits (models.scoring_bytes)."""
    kv, prefill = models.token_costs(model.config)
    total = torch.cuda.get_device_properties(device).total_memory
    room = 0.95 * total - torch.cuda.memory_allocated(device)
    per_row = models.scoring_bytes(model.config) if args.focus else 0
    return models.GenerationBudget(room, kv, prefill * (2 if args.focus else 1), args.batch, per_row)


def score_checkpoint(ckpt, cfg, names, args, rank, world, device):
    """Every benchmark of one checkpoint: summary.json and predictions.jsonl written to its
    output folder. Returns the summary {benchmark: {...}} and its mean focus curve."""
    master = rank == 0
    # only the flags load_model reads: a hub model has no train.py config to pass
    load_args = SimpleNamespace(attn=args.attn, trust_remote_code=args.trust_remote_code,
                                min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    # on a GPU bf16 weights, as the forwards compute in bf16 anyway: no fp32 copy and no
    # autocast cache of casts beside it (7B: 16.6 GB instead of 33 + 16.6 GB)
    gpu = device.type == "cuda"
    try:
        model, processor, attn = models.load_model(ckpt, load_args, device,
                                                   dtype=torch.bfloat16 if gpu else torch.float32)
    except ValueError as err:                       # a named, explained failure: no traceback
        raise SystemExit(str(err)) from None
    # inference only: dropout (if any) off
    model.eval()
    args.batch = args.batch or (256 if gpu else 16)
    budget = greedy_budget(model, args, device) if gpu else None
    policy = rollout.Policy(model)                  # policy.generate / policy.score, as in training
    # the instruction the checkpoint was trained with, so that it is scored on its own prompt
    instruction = args.instruction if args.instruction is not None else (
        cfg.instruction if cfg is not None else rollout.INSTRUCTION)
    jobs = []  # (name, samples, image finder, bare answers, max new tokens)
    if not names and not args.data:
        # the run's own validation task, answered as validation answers it (bare answers allowed)
        jobs.append(("validation", own_validation(cfg), benchmarks.ImageFinder("."), cfg.bare_answers,
                     cfg.val_max_new_tokens))
    for name in names + args.data:
        samples, root = benchmarks.load_benchmark(name, args)
        # a --data file is named after the file: bench/my_set.jsonl -> my_set
        label = name if name in benchmarks.BENCHMARKS else os.path.splitext(os.path.basename(name))[0]
        # the split picks its own image zip (benchmarks.split_zip_names); a --data file has none
        split = benchmarks.BENCHMARKS[name][1] if name in benchmarks.BENCHMARKS else None
        finder = benchmarks.ImageFinder(root, split, args.allow_outside_paths)
        # a wrong image layout stops here, before any generation, with the fix
        check_images(label, samples, finder)
        jobs.append((label, samples, finder, False, args.max_new_tokens))
    summary, predictions, all_records = {}, [], []
    for label, samples, finder, bare, max_new in jobs:
        # progress on stderr: stdout carries only the markdown table, so it can be redirected
        if master:
            print(f"{ckpt}: {label} ({len(samples)} samples, attention {attn}, "
                  f"{rollout.describe_sampling(0, 1.0)})", file=sys.stderr)
        records = run_benchmark(policy, processor, samples, finder, args, instruction, bare, max_new,
                                None, rank, world, device, budget)
        summary[label] = summarise(records, args.focus, processor.tokenizer,
                                   looks=label == "validation" and cfg.task == "look")
        check_failures(label, summary[label], records)
        # one instruction per prompt: PAPO_eval's questions carry their own. Written into
        # summary.json, so that a score says which prompt produced it
        own = sum(rollout.has_instruction(s["question"]) for s in samples)
        summary[label]["instruction"] = (
            "none" if not instruction and not own else
            f"the question's own (already in {own} of {len(samples)} questions), nothing appended"
            if own == len(samples) else
            f"appended to {len(samples) - own} of {len(samples)} questions: {instruction!r}"
            + (f"; the other {own} carry their own" if own else ""))
        all_records += records
        predictions += [dict(r, benchmark=label) for r in records]
        if args.image_ablation:
            # the same samples with blank (or noise) images: how much of the score needs the image
            ablated = run_benchmark(policy, processor, samples, finder, args, instruction, bare, max_new,
                                    args.image_ablation, rank, world, device, budget)
            summary[label][f"accuracy_{args.image_ablation}"] = summarise(ablated, False)["accuracy"]
            predictions += [dict(r, benchmark=label, ablation=args.image_ablation) for r in ablated]
    # a hub id has no folder of its own: Qwen/Qwen2.5-VL-7B-Instruct -> eval/Qwen__Qwen2.5-VL-7B-Instruct
    out_dir = args.output_dir or (os.path.join(ckpt, "eval") if os.path.isdir(ckpt)
                                  else os.path.join("eval", ckpt.replace("/", "__")))
    if len(args.ckpt) > 1 and args.output_dir:      # one sub-folder per checkpoint
        out_dir = os.path.join(args.output_dir, os.path.basename(os.path.normpath(ckpt)))
    # rank 0 alone writes: after the gather it holds every record
    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            for r in predictions:
                f.write(json.dumps({k: v for k, v in r.items() if k != "_tokens"}) + "\n")
        print(f"wrote {out_dir}/summary.json and predictions.jsonl", file=sys.stderr)
    return summary, mean_curve(all_records) if args.focus else None


def main(argv=None):
    args = build_parser().parse_args(argv)
    # the curve is made of focus values: --plot needs the extra forward of --focus
    if args.plot:
        args.focus = True
    names = args.bench or []
    # all = the nine PAPO_eval splits of the paper's table; testmini, with no paper figure,
    # is scored only when named
    if names == ["all"]:
        names = [n for n in benchmarks.BENCHMARKS if n != "mathvista_testmini"]
    # checked before any model is loaded (minutes at 7B)
    unknown = [n for n in names if n not in benchmarks.BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown}; valid: {', '.join(benchmarks.BENCHMARKS)} or all")
    # under torchrun every rank answers a share of each benchmark (gloo carries the records)
    ranks = parallel.start_ranks()
    rank, world, device = ranks.rank, ranks.world, ranks.device
    ckpts = [resolve_checkpoint(c) for c in args.ckpt]

    # a model without a validation task of its own (e.g. the base model beside its trained
    # checkpoint) is scored on the task of the first train.py checkpoint in --ckpt
    configs = {c: training_config(c) for c in ckpts}
    fallback = next((cfg for cfg in configs.values() if cfg is not None), None)
    table, curves = [], {}
    for ckpt in ckpts:
        cfg = configs[ckpt] or fallback
        if not names and not args.data and cfg is None:
            raise SystemExit(f"{ckpt} is not a train.py checkpoint, so it has no validation task of its "
                             f"own; pass --bench (or --data)")
        summary, curve = score_checkpoint(ckpt, cfg, names, args, rank, world, device)
        table += [(ckpt, label, s) for label, s in summary.items()]
        curves[ckpt] = curve
    if rank == 0:
        print(markdown_table(table, args))
        if args.plot:
            plot_curves(curves, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    # only a torchrun start made a process group (parallel.start_ranks)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
