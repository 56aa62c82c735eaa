"""
Benchmarks, printed side by side as ratios in one run. Not a test: nothing here fails.

    python bench.py                 # everything, on this machine's CPU (or GPU if present)

Sections 1-2 (the math, in this process):
1. vgpo_advantages (vectorised) vs the naive per-token loop of test_vgpo.py, on
   64 responses x 1024 tokens in groups of 8, the loop run twice: on Python floats
   (its fastest form) and on torch scalars (the same code indexing tensors element by
   element, as a first PyTorch draft would; ~15 s).
2. visual_focus (one batched matmul) vs a per-token cosine_similarity loop at the 7B
   hidden size D = 3584.
Sections 3-5 (each case in a fresh child process, so its peak memory is its own):
3. one VGPO training step vs one plain GRPO step (score with focus + vgpo_advantages +
   update, vs score + grpo_advantages + update) on the same fixed rollout of 128
   responses, for the tiny model and a mid-size random model: time and peak memory.
4. the log-prob pass (forward + backward of lm_head + log-softmax over a 152k vocabulary)
   in 256-position checkpointed chunks vs one full-logits block: peak memory.
5. rollout throughput: generated tokens per second of HF generate.
6. the same rollout under --fsdp (FSDP2 units with their weights gathered, as train.py
   samples) vs the plain model, in a one-rank process group: the cost of FSDP's hooks
   on every decoding step.
7. (--vgpo_vs_dapo N, on its own) the embedded default trained with VGPO and with
   --no_vgpo for N seeds each: accuracy, steps to 0.8, blank-image accuracy, late/early
   visual focus, mean and spread over seeds, and docs/vgpo_vs_dapo.png.
Peak memory is the process's peak resident set (CPU) or peak allocated memory (GPU).
Record the figures in BENCHMARKS.md with the machine and the command.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import infra
import vgpo
from test_vgpo import naive_visual_focus, naive_vgpo_advantages

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--responses", type=int, default=64, help="N responses for the advantage benchmark")
parser.add_argument("--tokens", type=int, default=1024, help="T tokens per response for the advantage benchmark")
parser.add_argument("--group_size", type=int, default=8, help="G responses per prompt")
parser.add_argument("--hidden", type=int, default=3584, help="D for the visual_focus benchmark (7B: 3584)")
parser.add_argument("--focus_tokens", type=int, default=512, help="T for the visual_focus benchmark")
parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each vectorised call (median reported)")
parser.add_argument("--skip_children", action="store_true", help="only sections 1-2 (the math)")
parser.add_argument("--vgpo_vs_dapo", type=int, default=0, metavar="SEEDS",
                    help="only section 7: python train.py with VGPO and with --no_vgpo for seeds 0..SEEDS-1, "
                         "each scored by eval.py; prints the table and writes docs/vgpo_vs_dapo.png")
parser.add_argument("--runs_dir", default="runs", help="section 7's run folders (finished runs are reused)")
parser.add_argument("--jobs", type=int, default=1, help="section 7: runs at once, sharing the CPU threads")
parser.add_argument("--child", default=None, help=argparse.SUPPRESS)   # internal: run one case
args = parser.parse_args()
torch.manual_seed(0)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory():
    return infra.peak_memory(DEVICE)          # allocated on the GPU, else the process's peak RSS


# ---- child cases (sections 3-5): run with --child NAME, print one JSON line ----

MODELS = {"tiny": dict(hidden=128, layers=2, vision_hidden=64, vision_depth=2),
          "mid": dict(hidden=1024, layers=8, vision_hidden=256, vision_depth=4)}


def child_step(size, use_vgpo):
    """Time one training step (score, advantages, update) on a fixed rollout."""
    import rollout
    import tiny
    import train

    path = tiny.build_tiny_model(os.path.join(tempfile.gettempdir(), f"vgpo-bench-{size}"), seed=0, **MODELS[size])
    targs = train.parse_args(["--rollout_batch", "16", "--group_size", "8", "--mini_batch", "16",
                              "--micro_batch", "32", "--lr", "1e-5"] + ([] if use_vgpo else ["--no_vgpo"]))
    model, processor, _ = infra.load_model(path, targs, DEVICE)
    policy = infra.Policy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr)
    examples = [tiny.counting_example(1, i) for i in range(16)]
    batch, ipr = rollout.encode_prompts(processor, examples, "")
    rows = torch.arange(16).repeat_interleave(8)
    prompts, row_ipr = rollout.take_rows(batch, ipr, rows)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with rollout.autocast(DEVICE):
        responses, mask, _ = rollout.generate(model, processor, rollout.to_device(prompts, DEVICE),
                                              max_new_tokens=64)
    gen_time = time.perf_counter() - t0
    roll = rollout.Rollout(prompts=prompts, ipr=row_ipr, responses=responses.cpu(), mask=mask.cpu(),
                           acc=torch.randint(0, 2, (128,), generator=torch.Generator().manual_seed(0)).float(),
                           group_ids=rows)
    switches = dict(intra=targs.intra, inter=targs.inter, compensation=targs.compensation, gate=targs.gate)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        old_logp, focus = train.score_rollouts(policy, roll, targs, DEVICE, focus=use_vgpo)
        if use_vgpo:
            adv, _ = vgpo.vgpo_advantages(roll.acc, roll.group_ids, focus, roll.mask, **switches)
        else:
            adv = torch.where(roll.mask, vgpo.grpo_advantages(roll.acc, roll.group_ids).unsqueeze(1), 0.0)
        roll.old_logp, roll.adv = old_logp, adv
        train.update_policy(policy, optimizer, params, roll, targs, 1, DEVICE)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return dict(time=statistics.median(times), peak=peak_memory(),
                tokens_per_s=float(mask.sum()) / gen_time,
                params=sum(p.numel() for p in model.parameters()))


def child_logp(chunk):
    """Forward + backward of the response log-probs, 4 x 1024 tokens, 152k vocabulary."""
    import rollout

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(512, 152064, bias=False, device=DEVICE)
    hidden = torch.randn(4, 1024, 512, device=DEVICE, requires_grad=True)
    tokens = torch.randint(0, 152064, (4, 1024), device=DEVICE)
    before = peak_memory()
    logp = rollout.response_logprobs(lm_head, hidden, tokens, chunk=chunk)
    logp.sum().backward()
    return dict(peak=peak_memory(), extra=peak_memory() - before)


def child_fsdp_generate(size):
    """Tokens/s of the same sampling, plain model vs sharded with full weights gathered."""
    import torch.distributed as dist

    import rollout
    import tiny
    import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29581", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    path = tiny.build_tiny_model(os.path.join(tempfile.gettempdir(), f"vgpo-bench-{size}"), seed=0, **MODELS[size])
    targs = train.parse_args(["--fsdp"])
    model, processor, _ = infra.load_model(path, targs, DEVICE, move=False)
    batch, _ = rollout.encode_prompts(processor, [tiny.counting_example(1, i) for i in range(32)], "")
    batch = rollout.to_device(batch, DEVICE)
    policy = infra.Policy(model)

    def sample():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with rollout.autocast(DEVICE):
            responses, mask, _ = policy(rollout.generate, processor, batch, max_new_tokens=64)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return float(mask.sum()) / (time.perf_counter() - t0), responses

    model.to(DEVICE)
    sample()                                                    # warm-up
    plain, plain_tokens = sample()
    model.cpu()
    infra.shard(policy, DEVICE)
    with infra.full_weights(policy):
        sample()
        sharded, sharded_tokens = sample()
    dist.destroy_process_group()
    return dict(plain=plain, fsdp=sharded, same=bool(torch.equal(plain_tokens, sharded_tokens)))


if args.child:
    kind, *rest = args.child.split(":")
    result = (child_step(rest[0], rest[1] == "vgpo") if kind == "step" else
              child_fsdp_generate(rest[0]) if kind == "fsdpgen" else child_logp(int(rest[0])))
    print(json.dumps(result))
    sys.exit(0)


def run_child(name):
    out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                         env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    if out.returncode != 0:
        raise SystemExit(f"bench case {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(fn, repeats):
    """Median wall time of fn() over `repeats` calls, after one warm-up call."""
    if repeats == 0:                                # very slow loops: one call, no warm-up
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -----------------------------------------------------------------------------
# 7. (--vgpo_vs_dapo N) the paper's claim at laptop scale: the embedded default trained
#    with VGPO and with --no_vgpo (DAPO) for N seeds each, every final checkpoint scored
#    by eval.py (blank images, visual focus), one table and one figure.

def run_quietly(cmd, threads, log):
    """Run one command with `threads` torch threads, its output to `log`; stop if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error")
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def read_run(out):
    """What one run logged: the validation curve (step 0 = the warm start) and summaries."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    # late minus early focus, not their ratio: a mean early focus near 0 makes the ratio explode
    drift = lambda r, p="": r[f"{p}val_focus_late"] - r[f"{p}val_focus_early"] if f"{p}val_focus_late" in r else None
    val = [(0, rows[0]["start_val_acc"], drift(rows[0], "start_"))]
    val += [(r["step"], r["val_acc"], drift(r)) for r in rows if "val_acc" in r]
    reach = next((step for step, acc, _ in val if acc >= 0.8), None)
    summary = json.load(open(os.path.join(infra.latest_checkpoint(out), "eval", "summary.json")))["validation"]
    ratio = lambda k: summary.get(k, {}).get("late_minus_early", float("nan"))
    return dict(curve=val, start=val[0][1], final=val[-1][1], best=max(acc for _, acc, _ in val[1:]),
                reach=reach, minutes=sum(r["time"] for r in rows) / 60,
                length=statistics.mean(r["response_len"] for r in rows[-10:]),
                blank=summary["accuracy_blank"], ratio_right=ratio("focus_correct"),
                ratio_wrong=ratio("focus_wrong"))


def mean_sd(values):
    values = [v for v in values if v is not None and v == v]          # drop None and nan
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def vgpo_vs_dapo(seeds, runs_dir, jobs):
    methods = {"VGPO": [], "DAPO": ["--no_vgpo"]}
    todo = [(m, s) for s in range(seeds) for m in methods
            if not os.path.exists(os.path.join(runs_dir, f"{m.lower()}-{s}", "eval_done"))]
    threads = max(1, 2 // jobs) if torch.get_num_threads() <= 2 else max(1, torch.get_num_threads() // jobs)
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            method, seed = todo.pop(0)
            out = os.path.join(runs_dir, f"{method.lower()}-{seed}")
            os.makedirs(out, exist_ok=True)
            # train (resumed if it was cut off), then score the final checkpoint with eval.py
            cmd = (f"{sys.executable} train.py --seed {seed} --out_dir {out} --resume {' '.join(methods[method])}"
                   f" && {sys.executable} eval.py --ckpt {out} --image_ablation blank --focus"
                   f" && touch {out}/eval_done")
            print(f"{method} seed {seed}: {out} ({threads} threads)", flush=True)
            running.append((run_quietly(["bash", "-c", cmd], threads, os.path.join(out, "log.txt")), out))
        time.sleep(5)
        for proc, out in list(running):
            if proc.poll() is not None:
                running.remove((proc, out))
                if proc.returncode:
                    raise SystemExit(f"{out} failed; see {out}/log.txt")
    results = {m: [read_run(os.path.join(runs_dir, f"{m.lower()}-{s}")) for s in range(seeds)] for m in methods}

    print(f"\nthe embedded default (python train.py), {seeds} seeds each: mean ± sd over seeds")
    head = ["method", "warm start acc", "final val acc", "best val acc", "steps to 0.8", "late-early focus, right",
            "late-early focus, wrong", "blank-image acc", "response tokens", "minutes"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for m, runs in results.items():
        keys = ("start", "final", "best", "reach", "ratio_right", "ratio_wrong", "blank", "length", "minutes")
        print(f"| {m} | " + " | ".join(mean_sd([r[k] for r in runs]) for k in keys) + " |")
    for k in ("final", "reach"):
        # the difference of two means of `seeds` runs has a standard error of sqrt(sd1²/n + sd2²/n):
        # a difference under about twice that is within seed-to-seed noise
        a, b = ([r[k] for r in results[m] if r[k] is not None] for m in methods)
        if len(a) > 1 and len(b) > 1:
            se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
            print(f"{k}: VGPO - DAPO = {statistics.mean(a) - statistics.mean(b):+.3f}, standard error {se:.3f} "
                  f"(resolvable: |difference| > {2 * se:.3f})")
    for m, runs in results.items():
        print(f"{m} per seed: final " + ", ".join(f"{r['final']:.3f}" for r in runs)
              + "; steps to 0.8 " + ", ".join(str(r["reach"]) for r in runs))
    plot_vgpo_vs_dapo(results, "docs/vgpo_vs_dapo.png")
    print("wrote docs/vgpo_vs_dapo.png")


def plot_vgpo_vs_dapo(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (method, runs), colour in zip(results.items(), ("tab:red", "tab:blue")):
        steps = [step for step, _, _ in runs[0]["curve"]]
        for ax, k in zip(axes, (1, 2)):
            # mean over seeds, and the band from the lowest to the highest seed
            values = torch.tensor([[float("nan") if p[k] is None else p[k] for p in r["curve"]] for r in runs])
            ax.plot(steps, values.nanmean(0), color=colour, marker="o", label=f"{method} ({len(runs)} seeds)")
            ax.fill_between(steps, values.min(0).values, values.max(0).values, color=colour, alpha=0.2)
    axes[0].set_ylabel("validation accuracy (greedy)")
    axes[1].set_ylabel("late minus early visual focus (validation answers)")
    for ax in axes:
        ax.set_xlabel("RL step (0 = the warm start)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("python train.py: VGPO vs DAPO (--no_vgpo), mean and min-max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if args.vgpo_vs_dapo:
    vgpo_vs_dapo(args.vgpo_vs_dapo, args.runs_dir, args.jobs)
    sys.exit(0)


rows = []  # (what, fast seconds, slow seconds)

# ---- 1. advantages: vectorised vs per-token loop ----
N, T = args.responses, args.tokens
rewards = torch.randint(0, 2, (N,)).float()
group_ids = torch.arange(N) // args.group_size
lengths = torch.randint(T // 4, T + 1, (N,))
lengths[0] = T
response_mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)     # (N, T)
focus = torch.randn(N, T)
fast = timed(lambda: vgpo.vgpo_advantages(rewards, group_ids, focus, response_mask), args.repeats)
slow = timed(lambda: naive_vgpo_advantages(rewards, group_ids, focus, response_mask), 1)
rows.append((f"vgpo_advantages {N}x{T}, loop on Python floats", fast, slow))
slow = timed(lambda: naive_vgpo_advantages(rewards, group_ids, focus, response_mask,
                                           python_floats=False), 0)
rows.append((f"vgpo_advantages {N}x{T}, loop on torch scalars", fast, slow))

# ---- 2. visual focus: batched matmul vs per-token cosine loop ----
Nf, Tf, P, D = 8, args.focus_tokens, 256, args.hidden
resp = torch.randn(Nf, Tf, D, dtype=torch.bfloat16)                     # (N, T, D)
prompt = torch.randn(Nf, P, D, dtype=torch.bfloat16)                    # (N, P, D)
image_mask = torch.zeros(Nf, P, dtype=torch.bool)
image_mask[:, 16:16 + 196] = True                                      # a 196-token image
fast = timed(lambda: vgpo.visual_focus(resp, prompt, image_mask), args.repeats)
slow = timed(lambda: naive_visual_focus(resp, prompt, image_mask), 1)
rows.append((f"visual_focus {Nf}x{Tf}, D={D}, cosine loop", fast, slow))

# ---- report: the math ----
print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
      f"torch {torch.__version__}")
print(f"| {'benchmark':<48} | {'vectorised':>11} | {'naive loop':>11} | {'speed-up':>9} |")
print(f"|{'-' * 50}|{'-' * 13}|{'-' * 13}|{'-' * 11}|")
for what, fast, slow in rows:
    print(f"| {what:<48} | {fast * 1e3:>8.2f} ms | {slow * 1e3:>8.1f} ms | {slow / fast:>8.0f}x |")

if args.skip_children:
    sys.exit(0)

# ---- 3. VGPO vs GRPO training step; 5. rollout throughput ----
print()
print(f"| {'training step (128 responses x 64 tokens)':<44} | {'GRPO':>10} | {'VGPO':>10} | {'VGPO/GRPO':>9} |")
print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 11}|")
rollout_rows = []
for size in ("tiny", "mid"):
    grpo, vg = run_child(f"step:{size}:grpo"), run_child(f"step:{size}:vgpo")
    label = f"{size} ({vg['params'] / 1e6:.1f}M params)"
    print(f"| {label + ', time':<44} | {grpo['time']:>8.2f} s | {vg['time']:>8.2f} s | {vg['time'] / grpo['time']:>9.3f} |")
    print(f"| {label + ', peak memory':<44} | {grpo['peak'] / 2**20:>7.0f} MB | {vg['peak'] / 2**20:>7.0f} MB | "
          f"{vg['peak'] / grpo['peak']:>9.3f} |")
    rollout_rows.append((label, grpo["tokens_per_s"]))

# ---- 4. chunked vs full log-prob pass ----
full, chunked = run_child("logp:0"), run_child("logp:256")
print()
print(f"| {'log-prob pass, 4 x 1024 tokens, V=152064':<44} | {'full':>10} | {'chunk 256':>10} | {'ratio':>9} |")
print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 11}|")
print(f"| {'memory added by forward + backward':<44} | {full['extra'] / 2**20:>7.0f} MB | "
      f"{chunked['extra'] / 2**20:>7.0f} MB | {chunked['extra'] / full['extra']:>9.3f} |")

# ---- 5. rollout throughput ----
print()
for label, tps in rollout_rows:
    print(f"rollout: {label}: {tps:,.0f} generated tokens/s (HF generate, 128 sequences, {DEVICE.type})")

# ---- 6. rollout under FSDP (weights gathered) vs the plain model ----
print()
print(f"| {'rollout, 32 prompts x 64 new tokens, tokens/s':<44} | {'plain':>10} | {'FSDP2':>10} | {'ratio':>9} |")
print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 11}|")
for size in ("tiny", "mid"):
    r = run_child(f"fsdpgen:{size}")
    # identical on CPU (fp32 both ways); on GPU the gathered weights are bf16, so samples drift
    label = f"{size}, 1 rank, " + ("same samples" if r["same"] else "samples differ")
    print(f"| {label:<44} | {r['plain']:>10,.0f} | {r['fsdp']:>10,.0f} | {r['fsdp'] / r['plain']:>9.3f} |")
