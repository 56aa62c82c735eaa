"""
Benchmarks, printed side by side as ratios in one run. Not a test: nothing here fails.

    python bench.py                 # everything, on this machine's CPU (or GPU if present)

1. vgpo_advantages (vectorised) vs the naive per-token loop of test_vgpo.py, on
   64 responses x 1024 tokens in groups of 8, the loop run twice: on Python floats
   (its fastest form) and on torch scalars (the same code indexing tensors element by
   element, as a first PyTorch draft would; ~15 s).
2. visual_focus (one batched matmul) vs a per-token cosine_similarity loop at the 7B
   hidden size D = 3584.
Record the figures in BENCHMARKS.md with the machine and the command.
"""

import argparse
import platform
import statistics
import time

import torch

import vgpo
from test_vgpo import naive_visual_focus, naive_vgpo_advantages

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--responses", type=int, default=64, help="N responses for the advantage benchmark")
parser.add_argument("--tokens", type=int, default=1024, help="T tokens per response for the advantage benchmark")
parser.add_argument("--group_size", type=int, default=8, help="G responses per prompt")
parser.add_argument("--hidden", type=int, default=3584, help="D for the visual_focus benchmark (7B: 3584)")
parser.add_argument("--focus_tokens", type=int, default=512, help="T for the visual_focus benchmark")
parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each vectorised call (median reported)")
args = parser.parse_args()
torch.manual_seed(0)


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

# ---- report ----
print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
      f"torch {torch.__version__}")
print(f"| {'benchmark':<48} | {'vectorised':>11} | {'naive loop':>11} | {'speed-up':>9} |")
print(f"|{'-' * 50}|{'-' * 13}|{'-' * 13}|{'-' * 11}|")
for what, fast, slow in rows:
    print(f"| {what:<48} | {fast * 1e3:>8.2f} ms | {slow * 1e3:>8.1f} ms | {slow / fast:>8.0f}x |")
