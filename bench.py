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
Peak memory is the process's peak resident set (CPU) or peak allocated memory (GPU).
Record the figures in BENCHMARKS.md with the machine and the command.
"""

import argparse
import json
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
