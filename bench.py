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
8. (--credit CKPT ..., on its own) where VGPO's token weights put the credit on the colour
   task: ψ on the count digits that decide the reward (and on the wrong ones), α of right
   and wrong answers, and how much of ψ is a fixed pattern over positions.
9. (--shape 7b | small, on its own) a random Qwen2.5-VL of the 7B shape (a GPU) or a small
   one (a CPU), before and after the vision rewiring and the bf16 sampling copy: decode
   ms/step and tokens/s (with the bandwidth bound on a known GPU), the update step (with
   MFU), vision patches encoded, attention calls, kernel launches (ATen op calls on a
   CPU), and VGPO/GRPO ratios of time and memory.
10. (--forgetting N, on its own) DAPO, VGPO and two controls of VGPO (focus shuffled within
   each response; φ a mean, not a sum) trained from one shared warm start per seed, seeds
   0..N-1: held-out and per-step accuracy, blank-image accuracy on prior prompts, the share
   of late errors that copy, the focus / image-dependence rank correlation at the start and
   the end, paired differences with standard errors, and docs/forgetting.png. With
   --forgetting_task look, the same arms on the look task (each late step looks at its cells
   or guesses from the count before): how fast held-out accuracy rises, and the sampled look
   rate, look accuracy and guess accuracy (--look_checks), in docs/forgetting_look.png.
11. (--recipe paper7b, on its own) the counts that set the 7B recipe's GPU time, before and
   after pooled sampling, token-budget generate() calls, hook-free FSDP sampling and the
   one load per job: sampling rounds per step and prompts drawn per kept group (the
   sampling rule simulated at a keep rate of 0.5 on 2, 4 and 8 ranks), rows per generate()
   call (the memory plan of the 7B shape on 80 GB), FSDP hook calls per decoded token, and
   peak CPU memory per rank while loading a mid-size model under --fsdp on 2 CPU ranks; and
   the prefill shared by a group, decoding in segments, the update's padding and whether
   --decode_cache static compiles once per shape, before and after. Last, the step those
   counts project on 8 GPUs, from decode ms a step measured at the plan's rows, the prefill
   and the update's FLOP/s (on a GPU the 7B shape; on a CPU a small one, which only
   exercises the arithmetic). --recipe projection: only the tables the projection uses.
Peak memory is the process's peak resident set (CPU) or peak allocated memory (GPU).
Record the figures in BENCHMARKS.md with the machine and the command.
"""

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import checkpoints
import dataset
import decode
import models
import parallel
import rollout
import vgpo
from test_vgpo import naive_visual_focus, naive_vgpo_advantages

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--responses", type=int, default=64, help="N responses for the advantage benchmark")
parser.add_argument("--tokens", type=int, default=1024,
                    help="T tokens per response for the advantage benchmark")
parser.add_argument("--group_size", type=int, default=8, help="G responses per prompt")
parser.add_argument("--hidden", type=int, default=3584, help="D for the visual_focus benchmark (7B: 3584)")
parser.add_argument("--focus_tokens", type=int, default=512, help="T for the visual_focus benchmark")
parser.add_argument("--repeats", type=int, default=5,
                    help="timed repeats of each vectorised call (median reported)")
parser.add_argument("--skip_children", action="store_true", help="only sections 1-2 (the math)")
parser.add_argument("--vgpo_vs_dapo", type=int, default=0, metavar="SEEDS",
                    help="only section 7: python train.py with VGPO and with --no_vgpo for seeds 0..SEEDS-1, "
                         "each scored by eval.py; prints the table and writes docs/vgpo_vs_dapo.png")
parser.add_argument("--runs_dir", default="runs", help="section 7's run folders (finished runs are reused)")
parser.add_argument("--jobs", type=int, default=1, help="section 7: runs at once, sharing the CPU threads")
parser.add_argument("--forgetting", type=int, default=0, metavar="SEEDS",
                    help="only section 10: DAPO, VGPO and VGPO's two controls from one warm start per seed, "
                         "seeds 0..SEEDS-1, paired differences with standard errors, docs/forgetting.png")
parser.add_argument("--forgetting_arms", nargs="+", default=None,
                    choices=["DAPO", "VGPO", "VGPO, focus shuffled", "VGPO, phi a mean"],
                    help="section 10: only these arms (default: all four)")
parser.add_argument("--forgetting_steps", type=int, default=None,
                    help="section 10: RL steps of each run (default: 150 on the colour task, the embedded "
                         "default's; 30 on the look task, which is learned faster: BENCHMARKS.md)")
parser.add_argument("--forgetting_task", choices=["colour", "look"], default="colour",
                    help="section 10: colour = the embedded default (the late-step prior); look = each late "
                         "step looks at its cells or guesses from the count before (tiny.py), so that a "
                         "group's responses take different paths; validated every 5 steps")
parser.add_argument("--look_checks", nargs="+", default=[], metavar="RUN",
                    help="only the look task's sampled figures of a run folder's warm start and final "
                         "checkpoint (look rate, look accuracy, guess accuracy where the prior misleads), "
                         "500 held-out prompts x 2 samples, written to RUN/look_checks.json")
parser.add_argument("--credit", nargs="+", default=[], metavar="CKPT",
                    help="only section 8: where VGPO's ψ and α put the credit on the colour task, "
                         "per checkpoint")
parser.add_argument("--shape", choices=["small", "7b"], default=None,
                    help="only section 9: a random Qwen2.5-VL of that shape (7b: Qwen2.5-VL-7B's, for a "
                         "GPU; small: for a CPU), before and after the vision rewiring and bf16 sampling: "
                         "decode, update step, vision patches encoded, attention calls and kernel launches, "
                         "VGPO/GRPO ratios")
parser.add_argument("--recipe", choices=["paper7b", "projection"], default=None,
                    help="only section 11: the counts that set the paper recipe's GPU time, before and after "
                         "(sampling rounds, prompts drawn per kept group, rows per generate() call, FSDP "
                         "hook calls per decoded token, peak CPU memory at load), and the step they project "
                         "from decode and update measured here; projection: only what the projection uses "
                         "(on a GPU, a few minutes)")
parser.add_argument("--child", default=None, help=argparse.SUPPRESS)   # internal: run one case
args = parser.parse_args()
# the same random inputs on every run: figures from two machines compare like with like
torch.manual_seed(0)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory():
    return parallel.peak_memory(DEVICE)          # allocated on the GPU, else the process's peak RSS


# ---- child cases (sections 3-5): run with --child NAME, print one JSON line ----

# two sizes: the tiny model's step is mostly fixed per-call overhead; the mid one shows the
# ratios where the matmuls weigh more
MODELS = {"tiny": dict(hidden=128, layers=2, vision_hidden=64, vision_depth=2),
          "mid": dict(hidden=1024, layers=8, vision_hidden=256, vision_depth=4)}


def bench_model(size, name=None):
    """The folder of a random tiny-architecture Qwen2.5-VL of MODELS[size] (seed 0), built
    once in the temp folder (`name` keeps a case's own copy apart)."""
    import tiny
    folder = os.path.join(tempfile.gettempdir(), f"vgpo-bench-{name or size}")
    return tiny.build_tiny_model(folder, seed=0, **MODELS[size])


def child_step(size, use_vgpo):
    """Time one training step (score, advantages, update) on a fixed rollout."""
    import tiny
    import train

    path = bench_model(size)
    targs = train.parse_args(["--rollout_batch", "16", "--group_size", "8", "--mini_batch", "16",
                              "--micro_batch", "32", "--lr", "1e-5"] + ([] if use_vgpo else ["--no_vgpo"]))
    model, processor, _ = models.load_model(path, targs, DEVICE, fast_vision=targs.fast_vision)
    policy = rollout.Policy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr)
    examples = [tiny.counting_example(1, i) for i in range(16)]
    batch, images_per_row = rollout.encode_prompts(processor, examples, "")
    # 16 prompts x G = 8: the 128 rows of one rollout, each prompt's copies next to each other
    rows = torch.arange(16).repeat_interleave(8)
    prompts, row_images = rollout.take_rows(batch, images_per_row, rows)
    # the same model and seed in the GRPO and the VGPO child: both draw the same rollout,
    # so their steps below run on the same responses
    torch.manual_seed(0)
    # one generate, no warm-up: section 5's tokens/s include a fresh process's first call
    t0 = time.perf_counter()
    with rollout.autocast(DEVICE):
        responses, mask, _ = rollout.generate(model, processor, rollout.to_device(prompts, DEVICE),
                                              max_new_tokens=64)
    gen_time = time.perf_counter() - t0
    # random 0/1 rewards: a step costs the same whichever responses are right
    roll = rollout.Rollout(prompts=prompts, images_per_row=row_images, responses=responses.cpu(),
                           mask=mask.cpu(),
                           reward=torch.randint(0, 2, (128,),
                                                generator=torch.Generator().manual_seed(0)).float(),
                           group_ids=rows)
    switches = dict(intra=targs.intra, inter=targs.inter, compensation=targs.compensation, gate=targs.gate)
    # three steps and their median: the first pays one-off costs (AdamW allocates its state,
    # the allocator grows), which the median leaves out
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        # GRPO skips the focus scores, so the VGPO/GRPO ratio includes what they cost
        old_logp, focus = train.score_rollouts(policy, roll, targs, DEVICE, focus=use_vgpo)
        if use_vgpo:
            adv, _ = vgpo.vgpo_advantages(roll.reward, roll.group_ids, focus, roll.mask, **switches)
        else:
            # GRPO: one advantage per response, the same on each of its tokens, 0 on padding
            adv = torch.where(roll.mask, vgpo.grpo_advantages(roll.reward, roll.group_ids).unsqueeze(1), 0.0)
        roll.old_logp, roll.adv = old_logp, adv
        train.update_policy(policy, optimizer, params, roll, targs, parallel.Ranks(device=DEVICE))
        # CUDA calls return before the GPU has finished: wait, or the clock stops early
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # tokens/s counts the valid response tokens (mask), not the padding after an EOS
    return dict(time=statistics.median(times), peak=peak_memory(),
                tokens_per_s=float(mask.sum()) / gen_time,
                params=sum(p.numel() for p in model.parameters()))


def child_logp(chunk):
    """Forward + backward of the response log-probs, 4 x 1024 tokens, 152k vocabulary."""

    torch.manual_seed(0)
    # Qwen's vocabulary on a small D: the full float32 logits, 4 x 1024 x 152064 x 4 bytes =
    # 2.5 GB, dwarf everything else, and they are what the chunks avoid holding at once
    lm_head = torch.nn.Linear(512, 152064, bias=False, device=DEVICE)
    hidden = torch.randn(4, 1024, 512, device=DEVICE, requires_grad=True)
    tokens = torch.randint(0, 152064, (4, 1024), device=DEVICE)
    # taken after the weights and inputs exist: `extra` is what the pass itself adds
    before = peak_memory()
    logp = rollout.response_logprobs(lm_head, hidden, tokens, chunk=chunk)
    logp.sum().backward()
    return dict(peak=peak_memory(), extra=peak_memory() - before)


def child_shared_prefill(size, new_tokens):
    """Seconds of one rollout round, 16 colour-task prompts x G = 8 (the default job's), with
    every row prefilled (before) and each prompt prefilled once for its 8 samples (after)."""
    import tiny
    import train

    path = bench_model(size)
    targs = train.parse_args([])
    model, processor, _ = models.load_model(path, targs, DEVICE, fast_vision=targs.fast_vision)
    batch, images_per_row = rollout.encode_prompts(processor, [tiny.colour_example(1, i) for i in range(16)],
                                                   "")
    # before: the 128 rows of the round, each prompt repeated 8 times, each row prefilled;
    # after: the 16 prompts once, and 8 samples of each from their shared cache
    repeats = torch.full((16,), 8)
    rows, _ = rollout.take_rows(batch, images_per_row, torch.arange(16).repeat_interleave(repeats))
    cases = {"before": (rollout.to_device(rows, DEVICE), None), "after": (rollout.to_device(batch, DEVICE),
                                                                          repeats)}
    out = {}
    for name, (prompts, counts) in cases.items():
        def call():
            torch.manual_seed(0)                     # both draw the same random numbers
            with rollout.autocast(DEVICE):
                out[name] = rollout.generate(model, processor, prompts, max_new_tokens=int(new_tokens),
                                             repeats=counts)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
        call()                                       # a warm-up, then the median of 3
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        out[name + "_s"] = statistics.median(times)
    # the same random numbers and the same logits: the same tokens, masks and truncations
    same = all(torch.equal(a, b) for a, b in zip(out["before"], out["after"]))
    return dict(before=out["before_s"], after=out["after_s"], same=same,
                prompt_len=int(batch["attention_mask"].sum(1).max()))


def child_segments(size, new_tokens, segment):
    """Seconds and decode row-steps of one sampling call, 8 prompts x 8 samples, in one
    segment (every row decoded until the longest ends) vs in segments of `segment` tokens
    that drop the finished rows (decode.in_segments). The random model stops on 2 frequent
    ids as well as its EOS, so that its responses end at many lengths, as a policy's do."""
    import decode
    import tiny
    import train

    path = bench_model(size)
    model, processor, _ = models.load_model(path, train.parse_args([]), DEVICE)
    model.generation_config.eos_token_id = [processor.tokenizer.eos_token_id, 42, 46]
    batch, _ = rollout.encode_prompts(processor, [tiny.colour_example(2, i) for i in range(8)], "")
    batch, repeats = rollout.to_device(batch, DEVICE), torch.full((8,), 8)
    # width 0: one segment of every new token, what a plain generate() call decodes
    out = {}
    for name, width in (("one", 0), ("segments", int(segment))):
        times, steps, lengths = [], [], []
        for seed in range(4):                        # the first is a warm-up
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            with rollout.autocast(DEVICE):
                _, mask, _ = rollout.generate(model, processor, batch, max_new_tokens=int(new_tokens),
                                              repeats=repeats, segment=width)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            # what the call decoded: every row to the longest, or each to the end of its segment
            steps.append(decode.row_steps(mask.sum(dim=1).cpu(), width))
            lengths.append(float(mask.sum(dim=1).float().mean()))
        out[name] = dict(time=statistics.median(times[1:]), row_steps=statistics.mean(steps[1:]),
                         mean_len=statistics.mean(lengths[1:]), rows=64)
    return out


def child_compile(which, port):
    """--decode_cache static with transformers' compiled decode step (on a CPU too, by its
    test switch), through the FSDP units (`fsdp`) or the hook-free twin (`twin`): the graphs
    and graph breaks dynamo makes on each call, 3 calls of one shape, then one of another."""
    import torch._dynamo.utils as dynamo_utils
    import torch.distributed as dist
    from transformers import CompileConfig

    import tiny
    import train

    # a one-rank process group, as in child_fsdp_generate
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    path = bench_model("tiny")
    targs = train.parse_args(["--fsdp", "--decode_cache", "static"])
    model, processor, _ = models.load_model(path, targs, DEVICE, move=False, fast_vision=targs.fast_vision)
    # transformers compiles generate's decode step with a static cache on a GPU; its test
    # switch does it on a CPU too ("default" mode: CUDA graphs need a GPU)
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True
    model.generation_config.compile_config = compile_config
    # the sharded policy, and the twin that decodes from its gathered weights without hooks
    policy = rollout.Policy(model)
    parallel.shard(policy, DEVICE)
    twin = parallel.sampling_copy(policy, targs)
    calls = []
    for prompts, seed in ((4, 0), (4, 1), (4, 2), (6, 3)):        # the last: another batch shape
        examples = [tiny.colour_example(seed, i) for i in range(prompts)]
        batch, _ = rollout.encode_prompts(processor, examples, "")
        # dynamo's counters of this call alone: graphs it compiled, and where it broke off
        dynamo_utils.counters.clear()
        t0 = time.perf_counter()
        with parallel.full_weights(policy):
            sampler = parallel.sampling_weights(twin, policy) if which == "twin" else policy
            sampler.generate(processor, rollout.to_device(batch, DEVICE), max_new_tokens=16, cache="static")
        # a graph break splits the compiled step (FSDP's hooks are marked not to be traced)
        calls.append(dict(rows=prompts, seconds=time.perf_counter() - t0,
                          graphs=dynamo_utils.counters["stats"].get("unique_graphs", 0),
                          breaks=sum(dynamo_utils.counters["graph_break"].values())))
    dist.destroy_process_group()
    return calls


def child_fsdp_generate(size):
    """Tokens/s of the same sampling, plain model vs sharded with full weights gathered."""
    import torch.distributed as dist

    import tiny
    import train

    # a one-rank process group: FSDP's hooks and gathers run, but with no other rank to talk
    # to, what the ratio measures is the hooks' own cost on every decoding step
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29581", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    path = bench_model(size)
    targs = train.parse_args(["--fsdp"])
    model, processor, _ = models.load_model(path, targs, DEVICE, move=False, fast_vision=targs.fast_vision)
    batch, _ = rollout.encode_prompts(processor, [tiny.counting_example(1, i) for i in range(32)], "")
    batch = rollout.to_device(batch, DEVICE)
    policy = rollout.Policy(model)

    def sample(sampler=policy):
        # reseeded every call: plain and sharded draw the same random numbers, so `same`
        # below compares like with like
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with rollout.autocast(DEVICE):
            responses, mask, _ = sampler.generate(processor, batch, max_new_tokens=64)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return float(mask.sum()) / (time.perf_counter() - t0), responses

    model.to(DEVICE)
    sample()                                                    # warm-up
    plain, plain_tokens = sample()
    model.cpu()
    parallel.shard(policy, DEVICE)
    twin = parallel.sampling_copy(policy, targs)
    hooks = {}
    # weights gathered once around the whole generate, as train.py samples (a warm-up
    # again: the sharded model's first call has one-off costs of its own). Before: generate
    # through the sharded policy, whose units run FSDP's hooks at every decoded token;
    # after: through the hook-free twin bound to the same gathered weights (train.py today)
    from torch.distributed.fsdp import FSDPModule
    for name, sampler in (("fsdp", policy), ("twin", twin)):
        with parallel.full_weights(policy):
            sampler = parallel.sampling_weights(sampler, policy) if name == "twin" else policy
            sample(sampler)
            calls = []
            counter = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda module, _: calls.append(1) if isinstance(module, FSDPModule) else None)
            tps, tokens = sample(sampler)
            counter.remove()
        # one forward of the batch per decoding step: the responses' width
        hooks[name] = (tps, tokens, len(calls) / tokens.shape[1])
    dist.destroy_process_group()
    return dict(plain=plain, fsdp=hooks["fsdp"][0], twin=hooks["twin"][0],
                same=bool(torch.equal(plain_tokens, hooks["fsdp"][1]) and torch.equal(plain_tokens,
                                                                                     hooks["twin"][1])),
                hooks_fsdp=hooks["fsdp"][2], hooks_twin=hooks["twin"][2])


def child_load(mode, path):
    """Peak CPU memory of this rank (torchrun, 2 ranks) loading `path` under --fsdp:
    before = every rank reads the weights; after = rank 0 reads, the others receive."""
    import torch.distributed as dist

    import train

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    targs = train.parse_args(["--fsdp", "--model", path])
    # the model's code imported (an empty model built on the meta device) before the baseline:
    # what the load adds is then its weights and what moving them costs, not transformers' import
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        AutoModelForImageTextToText.from_config(models.read_model_config(path, targs))
    before_load = peak_memory()
    model, _, _ = models.load_model(path, targs, DEVICE, move=False, weights=mode == "before" or rank == 0)
    parallel.shard(rollout.Policy(model), DEVICE, from_rank0=mode == "after")
    out = dict(rank=rank, peak=peak_memory(), start=before_load,
               params=sum(p.numel() for p in model.parameters()))
    with open(f"{path}.{mode}.{rank}.json", "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


# ---- section 9 (--shape): a random Qwen2.5-VL of a real shape, before and after the
#      vision rewiring and the bf16 sampling copy ----

# Qwen2.5-VL-7B-Instruct's shapes (config.json); "small" keeps the layout (windowed and
# full-attention vision blocks, 448-pixel windows of 4x4 merged tokens) at a CPU's size
SHAPES = {
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
               image=448, new_tokens=128, response=256, update_layers=4, micro_batch=8),
    "small": dict(text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
                  vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                              out_hidden_size=256, window_size=112, fullatt_block_indexes=[3]),
                  image=224, new_tokens=32, response=64, update_layers=4, micro_batch=16),
}
PROMPTS, G = 8, 8                                   # 8 prompts x G = 8: 64 sequences
# bf16 dense tensor-core FLOP/s and memory bandwidth, by GPU name (the bound columns):
# FLOP/s for the update step's MFU, bandwidth for the decode bound (decoding reads every
# weight once a token, so bytes, not FLOPs, set its floor)
GPUS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def shape_processor(side):
    """A processor that keeps every image `side` pixels square (tiny.py's tokenizer)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    import tiny
    # min and max pixels both side²: every image stays side x side, so the patch count is fixed
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size={"shortest_edge": side * side,
                                                                           "longest_edge": side * side}),
                               video_processor=Qwen2VLVideoProcessor(), tokenizer=tiny.build_tokenizer(),
                               chat_template=tiny.CHAT_TEMPLATE)


def shape_model(shape, layers, dtype=torch.float32):
    """A randomly initialised Qwen2.5-VL of SHAPES[shape] with `layers` decoder layers, on
    DEVICE in `dtype`, and a processor for its images (tiny.py's tokenizer)."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    import tiny
    spec = SHAPES[shape]
    tokenizer = tiny.build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    head_dim = spec["text"]["hidden_size"] // spec["text"]["num_attention_heads"]
    # M-RoPE splits head_dim / 2 rotary frequencies 2:3:3 over time, height and width: the
    # 7B's [16, 24, 24] at head_dim 128, scaled to any head_dim; untied lm_head as in the 7B
    config = Qwen2_5_VLConfig(
        text_config=dict(spec["text"], num_hidden_layers=layers, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section":
                                          [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(spec["vision"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model, shape_processor(spec["image"])


def shape_batch(processor, shape):
    """PROMPTS colour-task prompts with images of the shape's side, each repeated G times."""
    import tiny
    side = SHAPES[shape]["image"]
    examples = [tiny.colour_example(1, i) for i in range(PROMPTS)]
    for ex in examples:
        ex["images"] = [im.resize((side, side)) for im in ex["images"]]
    batch, images_per_row = rollout.encode_prompts(processor, examples, "")
    return rollout.take_rows(batch, images_per_row, torch.arange(PROMPTS).repeat_interleave(G))


class Counters:
    """Vision patches encoded and attention calls made while it is active (CPU-measurable
    proxies for the work the GPU is handed)."""

    def __init__(self, model):
        self.patches, self.sdpa = 0, 0
        self.hook = model.model.visual.register_forward_pre_hook(self._patches)
        self.original = torch.nn.functional.scaled_dot_product_attention

        def sdpa(*a, **k):
            self.sdpa += 1
            return self.original(*a, **k)
        torch.nn.functional.scaled_dot_product_attention = sdpa

    def _patches(self, module, inputs):
        self.patches += inputs[0].shape[0]

    def close(self):
        self.hook.remove()
        torch.nn.functional.scaled_dot_product_attention = self.original


def launches(fn):
    """Kernel launches of fn() (GPU), or ATen operator calls on a CPU (each launches at least
    one kernel on a GPU)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    if DEVICE.type == "cuda":
        return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def synced():
    # the clock is read only once the GPU has finished the work queued so far
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def child_shape(shape, variant, method):
    """One case of section 9: variant "before" (transformers' vision path, fp32 sampling
    weights) or "after" (--fast_vision, --sample_dtype auto); method "decode" (sampling)
    or "vgpo" / "grpo" (one update step), each in its own process for its own peak memory."""
    import train
    spec = SHAPES[shape]
    targs = train.parse_args(["--task", "colour", "--rollout_batch", str(PROMPTS), "--group_size", str(G),
                              "--mini_batch", str(PROMPTS), "--micro_batch", str(spec["micro_batch"]),
                              "--max_new_tokens", str(spec["new_tokens"]), "--gradient_checkpointing",
                              "--sample_dtype", "auto" if variant == "after" else "float32"]
                             + ([] if variant == "after" else ["--no-fast_vision"])
                             + ([] if method == "vgpo" else ["--no_vgpo"]))
    out = {}
    if method == "decode":
        # ---- decode, with every decoder layer ----
        model, processor = shape_model(shape, spec["text"]["num_hidden_layers"])
        if variant == "after":
            models.speed_up_vision(model, "sdpa")
        policy = rollout.Policy(model)
        sampler = parallel.sampling_copy(policy, targs)
        batch, _ = shape_batch(processor, shape)
        batch = rollout.to_device(batch, DEVICE)
        settings = rollout.sampling_settings(1.0, 1.0)

        def generate(n):
            with torch.no_grad(), rollout.autocast(DEVICE):
                return sampler.model.generate(**batch, max_new_tokens=n, min_new_tokens=n,
                                              pad_token_id=processor.tokenizer.pad_token_id, **settings)
        n = spec["new_tokens"]
        generate(2)                                                     # warm-up
        # decode time per token = (n tokens - 1 token) / (n - 1): prefill cancels out
        # (min_new_tokens=n: no sequence stops early, so every call makes exactly n steps)
        t0 = synced()
        generate(1)
        prefill = synced() - t0
        counters = Counters(sampler.model)
        t0 = synced()
        generate(n)
        total = synced() - t0
        counters.close()
        # launches are counted in a call of their own: the profiler slows what it watches,
        # so it stays out of the timed ones
        return dict(prefill_s=prefill, decode_ms=1e3 * (total - prefill) / (n - 1),
                    tokens_per_s=len(batch["input_ids"]) * n / total, rollout_patches=counters.patches,
                    rollout_launches=launches(lambda: generate(n)), prompt_len=batch["input_ids"].shape[1],
                    text_params=sum(p.numel() for p in model.model.language_model.parameters()),
                    lm_head=model.lm_head.weight.numel(), sdpa_rollout=counters.sdpa)
    # ---- one update step (score with focus, advantages, update), fewer decoder layers ----
    # fp32 weights, gradients and AdamW's two moments take 16 bytes a parameter, ~133 GB for
    # all of the 7B: `update_layers` decoder layers keep the step on one GPU, and MFU below
    # counts only the layers that ran
    model, processor = shape_model(shape, spec["update_layers"])
    if variant == "after":
        models.speed_up_vision(model, "sdpa")
    model.gradient_checkpointing_enable()
    # a training forward needs no KV cache (HF would switch it off under checkpointing anyway)
    model.config.use_cache = False
    policy = rollout.Policy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    batch, row_images = shape_batch(processor, shape)
    n = len(batch["input_ids"])
    gen = torch.Generator().manual_seed(0)
    # every row a full-length response (mask all True): the step's work is fixed by the shape
    responses = torch.randint(10, 90, (n, spec["response"]), generator=gen)   # character tokens, no EOS
    roll = rollout.Rollout(prompts=batch, images_per_row=row_images, responses=responses,
                           mask=torch.ones(n, spec["response"], dtype=torch.bool),
                           reward=torch.randint(0, 2, (n,), generator=gen).float(),
                           group_ids=torch.arange(PROMPTS).repeat_interleave(G))

    def step():
        old_logp, focus = train.score_rollouts(policy, roll, targs, DEVICE, focus=method == "vgpo")
        roll.adv, _ = (
            train.token_advantages(roll, focus, train.vgpo_switches(targs)) if method == "vgpo" else
            (torch.where(roll.mask, vgpo.grpo_advantages(roll.reward, roll.group_ids).unsqueeze(1), 0.0),
             None))
        roll.old_logp = old_logp
        train.update_policy(policy, optimizer, params, roll, targs, parallel.Ranks(device=DEVICE))

    step()                                                              # warm-up (and AdamW's state)
    # the peak from here is a steady step's, AdamW's state included (it lives on); a CPU's
    # peak RSS is not reset, so there it covers the warm-up too
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counters = Counters(model)
    # the faster of two steps: the work is fixed, so noise can only add time
    times = []
    for _ in range(2):
        t0 = synced()
        step()
        times.append(synced() - t0)
    counters.close()
    # counters // 2: per step, over the two timed steps; update_tokens: the prompt's real
    # tokens (left padding excluded) plus the responses; rows come as G copies of a prompt
    # with one image each, so every G-th image grid is a distinct image
    out.update(update_s=min(times), update_peak=peak_memory(), update_patches=counters.patches // 2,
               sdpa_update=counters.sdpa // 2, update_launches=launches(step),
               update_text_params=sum(p.numel() for p in model.model.language_model.layers.parameters()),
               vision_params=sum(p.numel() for p in model.model.visual.parameters()),
               update_tokens=int(batch["attention_mask"].sum()) + n * spec["response"],
               response_tokens=n * spec["response"], lm_head=model.lm_head.weight.numel(),
               distinct_patches=int(batch["image_grid_thw"][::G].prod(1).sum()))
    return out


def known_gpu():
    """(FLOP/s, bytes/s) of this GPU from GPUS, or None (a CPU, or a GPU not listed)."""
    return next((v for k, v in GPUS.items() if DEVICE.type == "cuda" and k in torch.cuda.get_device_name()),
                None)


def update_flops(x):
    """Model FLOPs of an update step (child_shape's `x`): the work that must be done, each
    distinct image once. 8 per parameter and token: 2 for the no-grad scoring forward, 6 for
    the update's forward and backward; checkpointing's recompute is not counted (MFU counts
    the model's FLOPs, not the hardware's)."""
    return 8 * (x["update_text_params"] * x["update_tokens"] + x["lm_head"] * x["response_tokens"]
                + x["vision_params"] * x["distinct_patches"])


def shape_table(shape):
    """Section 9's table: before / after side by side, and the bounds on a known GPU."""
    if shape == "7b" and DEVICE.type != "cuda":
        raise SystemExit("--shape 7b builds 8.3B parameters (33 GB in fp32) and needs a GPU; "
                         "on a CPU, --shape small prints the same table at a CPU's size")
    r = {(v, m): run_child(f"shape:{shape}:{v}:{m}")
         for v in ("before", "after") for m in ("decode", "vgpo", "grpo")}
    gpu = known_gpu()
    spec = SHAPES[shape]
    print(f"shape {shape}: {PROMPTS} prompts x G={G}, {spec['image']}x{spec['image']} images, "
          f"{spec['text']['num_hidden_layers']} decoder layers for decode and {spec['update_layers']} "
          f"for the update step; {DEVICE.type}"
          + (f" ({torch.cuda.get_device_name()})" if DEVICE.type == "cuda" else ""))
    rows = []

    def add(what, before, after, fmt, bound=None):
        rows.append((what, fmt.format(before), fmt.format(after), after / before if before else float("nan"),
                     bound))
    b, a = r["before", "decode"], r["after", "decode"]
    # decode: bf16 weights of the decoder layers and lm_head, plus the KV cache, once a token
    # kv: bytes of cache per token of context (K and V, every layer, bf16); the context grows
    # from the prompt to prompt + new_tokens, so on average it is prompt + new_tokens / 2; the
    # bound's % is the share of the bandwidth roofline each variant reaches
    kv = 2 * spec["text"]["num_hidden_layers"] * spec["text"]["num_key_value_heads"] * 2 * (
        spec["text"]["hidden_size"] // spec["text"]["num_attention_heads"])
    context = b["prompt_len"] + spec["new_tokens"] / 2
    bound_ms = (1e3 * (2 * (b["text_params"] + b["lm_head"]) + PROMPTS * G * context * kv) / gpu[1]
                if gpu else None)
    add("decode, ms / step", b["decode_ms"], a["decode_ms"], "{:.2f}",
        bound_ms and f"{bound_ms:.2f} ms bound, "
                     f"{100 * bound_ms / b['decode_ms']:.0f}% -> {100 * bound_ms / a['decode_ms']:.0f}%")
    add("decode, tokens / s", b["tokens_per_s"], a["tokens_per_s"], "{:,.0f}")
    add("prefill, s", b["prefill_s"], a["prefill_s"], "{:.3f}")
    add("rollout: vision patches encoded", b["rollout_patches"], a["rollout_patches"], "{:,}")
    add("rollout: attention calls", b["sdpa_rollout"], a["sdpa_rollout"], "{:,}")
    add("rollout: kernel launches" if gpu or DEVICE.type == "cuda" else "rollout: ATen op calls",
        b["rollout_launches"], a["rollout_launches"], "{:,}")
    b, a = r["before", "vgpo"], r["after", "vgpo"]
    add("update step, s (VGPO)", b["update_s"], a["update_s"], "{:.2f}",
        gpu and f"MFU {100 * update_flops(b) / b['update_s'] / gpu[0]:.1f}% -> "
                f"{100 * update_flops(a) / a['update_s'] / gpu[0]:.1f}%")
    add("update: vision patches encoded", b["update_patches"], a["update_patches"], "{:,}")
    add("update: attention calls", b["sdpa_update"], a["sdpa_update"], "{:,}")
    add("update: kernel launches" if DEVICE.type == "cuda" else "update: ATen op calls",
        b["update_launches"], a["update_launches"], "{:,}")
    for v in ("before", "after"):
        vg, gr = r[v, "vgpo"], r[v, "grpo"]
        rows.append((f"VGPO / GRPO ({v}): time, memory", f"{vg['update_s'] / gr['update_s']:.3f}",
                     f"{vg['update_peak'] / gr['update_peak']:.3f}", float("nan"), None))
    print(f"| {'what':<34} | {'before':>12} | {'after':>12} | {'after/before':>12} |"
          + (" bound |" if gpu else ""))
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 14}|{'-' * 14}|" + ("---|" if gpu else ""))
    for what, before, after, ratio, bound in rows:
        # nan != nan: rows without an after/before ratio (the VGPO / GRPO rows, or a zero
        # "before") print it blank
        ratio = "" if ratio != ratio else f"{ratio:.3f}"
        print(f"| {what:<34} | {before:>12} | {after:>12} | {ratio:>12} |"
              + (f" {bound or ''} |" if gpu else ""))


# ---- section 11's measured figures: decode and prefill of the whole model, at the rows a
#      call holds (the projection of the recipe's step, projection_table, uses them) ----

# two image sides per shape: prompts of about 1,000 and 2,000 tokens on the 7B (ViRL39K's
# are mostly 500-1,000: BENCHMARKS.md), 100 and 300 on the small shape
PROJECTION_SIDES = {"7b": (868, 1232), "small": (224, 448)}
VAL_PROMPTS = 2000                  # PAPO_MMK12_test, the preset's validation set (VGPO.md)


def child_project(shape):
    """Decode ms a step of a random `shape` Qwen2.5-VL with every decoder layer, in the bf16 of
    the sampling copy (fp32 on a CPU), each prompt prefilled once for its G samples as train.py
    samples: at the rows a call holds (the 7B plan on this GPU, at the shorter prompts; 64 on
    a CPU), at an eighth of them, and at the longer prompts; and the prefill's seconds."""
    import tiny
    from test_vgpo import qwen25_vl_7b_config
    spec = SHAPES[shape]
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    sides = PROJECTION_SIDES[shape]
    import train
    preset = train.parse_args(["--preset", "paper7b"])
    model, _ = shape_model(shape, spec["text"]["num_hidden_layers"], dtype=dtype)
    processor = shape_processor(sides[0])
    models.speed_up_vision(model, "sdpa")
    out = dict(text_params=sum(p.numel() for p in model.model.language_model.layers.parameters()),
               lm_head=model.lm_head.weight.numel(),
               vision_params=sum(p.numel() for p in model.model.visual.parameters()), points=[])
    # min_new_tokens: no row stops early, so a call of n new tokens makes exactly n steps;
    # the rest as rollout.generate samples for the preset (top-p 0.99 sorts every row's
    # logits a step, and the suppressed ids are masked)
    n = spec["new_tokens"] // 2
    settings = dict(rollout.sampling_settings(preset.temperature, preset.top_p),
                    pad_token_id=processor.tokenizer.pad_token_id,
                    eos_token_id=rollout.eos_ids(model, processor),
                    suppress_tokens=rollout.suppressed_ids(model, processor))

    def prompts(side, count):
        """`count` distinct colour-task prompts, their images `side` pixels square."""
        examples = [tiny.colour_example(1, i) for i in range(count)]
        for ex in examples:
            ex["images"] = [im.resize((side, side)) for im in ex["images"]]
        return rollout.to_device(rollout.encode_prompts(shape_processor(side), examples, "")[0], DEVICE)

    def call(batch, tokens):
        repeats = torch.full((len(batch["input_ids"]),), G)
        with torch.no_grad(), rollout.autocast(DEVICE):
            decode.generate(model, batch, tokens, dict(settings, min_new_tokens=min(n, tokens)), "dynamic",
                            repeats, 0)
    length = int(prompts(sides[0], 1)["attention_mask"].sum())
    rows = 64
    if DEVICE.type == "cuda" and shape == "7b":
        # the rows train.py's plan gives a call of these prompts on this GPU, 8 ranks, paper7b
        n_7b = sum(p.numel() for p in model.parameters())
        capacity = torch.cuda.get_device_properties(DEVICE).total_memory
        plan = models.memory_plan(qwen25_vl_7b_config(), n_7b, n_7b, preset, 8, capacity)
        rows = plan["budget"].rows(length, preset.max_new_tokens)
        # validation's calls, as train.validate sizes them: every row its own prompt
        b = plan["budget"]
        out["val_rows"] = models.GenerationBudget(b.room, b.kv, b.prefill, preset.val_batch).rows(
            length, preset.val_max_new_tokens)
    out.setdefault("val_rows", rows)
    out["rows"] = rows = max(G, rows // G * G)                    # whole groups
    for side, count in ((sides[0], rows // G), (sides[0], max(1, rows // G // 8)), (sides[1], rows // G)):
        batch = prompts(side, count)
        call(batch, 2)                                             # warm-up

        def seconds(tokens):                                       # the median of 3 calls
            times = []
            for _ in range(3):
                t0 = synced()
                call(batch, tokens)
                times.append(synced() - t0)
            return statistics.median(times)
        # decode ms a step = (n tokens - 1 token) / (n - 1): the prefill cancels out
        prefill, total = seconds(1), seconds(n)
        out["points"].append(dict(rows=count * G, prompt_len=int(batch["attention_mask"].sum(1).max()),
                                  new_tokens=n, prefill_s=prefill, ms=1e3 * (total - prefill) / (n - 1),
                                  peak=peak_memory()))
    return out


# a child runs its one case and exits here, before any of the parent's sections below
if args.child:
    kind, *rest = args.child.split(":")
    if kind == "shape":
        print(json.dumps(child_shape(*rest)))
        sys.exit(0)
    if kind == "load":                              # under torchrun: every rank writes its own file
        child_load(rest[0], ":".join(rest[1:]))
        sys.exit(0)
    result = (child_step(rest[0], rest[1] == "vgpo") if kind == "step" else
              child_fsdp_generate(rest[0]) if kind == "fsdpgen" else
              child_shared_prefill(*rest) if kind == "prefill" else
              child_segments(*rest) if kind == "segments" else
              child_compile(*rest) if kind == "compile" else
              child_project(rest[0]) if kind == "project" else child_logp(int(rest[0])))
    print(json.dumps(result))
    sys.exit(0)


def run_child(name):
    # a fresh interpreter per case: its peak memory is its own, not the high-water mark of
    # every case before it; its result is the last line of its stdout
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
    # the warm-up pays the one-off costs (allocations, thread pool start-up) outside the clock;
    # the median is not moved by one call the OS interrupted
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


def train_then_eval(out, seed, train_flags, eval_flags, first="", then=""):
    """One run of sections 7 and 10, as a shell command: train (resumed if it was cut off),
    score the final checkpoint (after `first`, e.g. the warm start) with eval.py, run `then`
    (a command, if any), and mark the run done, so that a finished run is reused."""
    ckpts = f"{first} {out}" if first else out
    return (f"{sys.executable} train.py --seed {seed} --out_dir {out} --resume {' '.join(train_flags)}"
            f" && {sys.executable} eval.py --ckpt {ckpts} {eval_flags}{f' && {then}' if then else ''}"
            f" && touch {out}/eval_done")


def run_all(runs, jobs, threads):
    """Run (label, out, command) triples, `jobs` at a time, each command's output in out/log.txt;
    stop at the first that fails."""
    running = []
    while runs or running:
        while runs and len(running) < jobs:
            label, out, cmd = runs.pop(0)
            print(f"{label}: {out} ({threads} threads)", flush=True)
            running.append((run_quietly(["bash", "-c", cmd], threads, os.path.join(out, "log.txt")), out))
        time.sleep(5)
        for proc, out in list(running):
            if proc.poll() is not None:
                running.remove((proc, out))
                if proc.returncode:
                    raise SystemExit(f"{out} failed; see {out}/log.txt")


def read_run(out):
    """What one run logged: the validation curve (step 0 = the warm start) and summaries."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    # late minus early focus, not their ratio: a mean early focus near 0 makes the ratio explode
    drift = lambda r, p="": (r[f"{p}val_focus_late"] - r[f"{p}val_focus_early"]
                             if f"{p}val_focus_late" in r else None)
    val = [(0, rows[0]["start_val_acc"], drift(rows[0], "start_"))]
    val += [(r["step"], r["val_acc"], drift(r)) for r in rows if "val_acc" in r]
    # the first validation step at 0.8 accuracy or above; None if the run never got there
    reach = next((step for step, acc, _ in val if acc >= 0.8), None)
    summary = json.load(open(os.path.join(checkpoints.latest_checkpoint(out), "eval",
                                          "summary.json")))["validation"]
    ratio = lambda k: summary.get(k, {}).get("late_minus_early", float("nan"))
    return dict(curve=val, start=val[0][1], final=val[-1][1], best=max(acc for _, acc, _ in val[1:]),
                reach=reach, minutes=sum(r["time"] for r in rows) / 60,
                length=statistics.mean(r["response_len"] for r in rows[-10:]),
                blank=summary["accuracy_blank"], ratio_right=ratio("focus_correct"),
                ratio_wrong=ratio("focus_wrong"))


def mean_sd(values):
    """"mean ± sd", over the values that are numbers; "(n=3)" after it when some were not (a
    share of nothing, such as the accuracy of guesses where nothing guessed, is nan)."""
    kept = [v for v in values if v is not None and v == v]            # drop None and nan
    if not kept:
        return "-"
    sd = statistics.stdev(kept) if len(kept) > 1 else 0.0
    dropped = f" (n={len(kept)})" if len(kept) < len(values) else ""
    return f"{statistics.mean(kept):.3f} ± {sd:.3f}{dropped}"


def vgpo_vs_dapo(seeds, runs_dir, jobs):
    methods = {"VGPO": [], "DAPO": ["--no_vgpo"]}
    # eval_done is written only after eval.py finished: a run without it is (re)started
    todo = [(m, s) for s in range(seeds) for m in methods
            if not os.path.exists(os.path.join(runs_dir, f"{m.lower()}-{s}", "eval_done"))]
    # the CPU's threads shared out between the runs at once, so they do not oversubscribe it
    threads = max(1, 2 // jobs) if torch.get_num_threads() <= 2 else max(1, torch.get_num_threads() // jobs)
    runs = []
    for method, seed in todo:
        out = os.path.join(runs_dir, f"{method.lower()}-{seed}")
        os.makedirs(out, exist_ok=True)
        # train (resumed if it was cut off), then score the final checkpoint with eval.py
        runs.append((f"{method} seed {seed}", out,
                     train_then_eval(out, seed, methods[method], "--image_ablation blank --focus")))
    run_all(runs, jobs, threads)
    results = {m: [read_run(os.path.join(runs_dir, f"{m.lower()}-{s}")) for s in range(seeds)]
               for m in methods}

    print(f"\nthe embedded default (python train.py), {seeds} seeds each: mean ± sd over seeds")
    head = ["method", "warm start acc", "final val acc", "best val acc", "steps to 0.8",
            "late-early focus, right", "late-early focus, wrong", "blank-image acc", "response tokens",
            "minutes"]
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
            print(f"{k}: VGPO - DAPO = {statistics.mean(a) - statistics.mean(b):+.3f}, "
                  f"standard error {se:.3f} (resolvable: |difference| > {2 * se:.3f})")
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
            values = torch.tensor([[float("nan") if p[k] is None else p[k] for p in r["curve"]]
                                   for r in runs])
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


# -----------------------------------------------------------------------------
# 10. (--forgetting N) does VGPO counter visual forgetting, and is it the vision? The
#     embedded default (its training prompts carry a late-step text prior, its held-out
#     prompts do not) trained by four arms from the SAME warm start per seed: DAPO, VGPO,
#     and two controls of VGPO that keep everything but one thing it could use: the link
#     between a token and its focus (--control_shuffle_focus), and α's growth with length
#     (--control_phi_mean). Paired by seed, so that the warm start's luck cancels out.

FORGETTING_ARMS = {"DAPO": ["--no_vgpo"], "VGPO": [], "VGPO, focus shuffled": ["--control_shuffle_focus"],
                   "VGPO, phi a mean": ["--control_phi_mean"]}


def forgetting_run(out, task="colour"):
    """One arm's run: its final validation and, from eval.py --focus, the focus / image
    dependence rank correlation of the warm start and of the final checkpoint; on the look
    task also held-out accuracy at steps 5 and 10 and its mean over the validations (how fast
    looking is learned), and the sampled figures of look_checks."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    last = [r for r in rows if "val_acc" in r][-1]
    start = json.load(open(os.path.join(out, "tiny-init-warm", "eval", "summary.json")))["validation"]
    final = checkpoints.latest_checkpoint(out)
    end = json.load(open(os.path.join(final, "eval", "summary.json")))["validation"]
    # (step, held-out accuracy, blank-image read-out, greedy look rate: nan on the colour task)
    curve = [(0, rows[0]["start_val_acc"], rows[0]["start_val_blank_prior_acc"],
              rows[0].get("start_val_look_rate", float("nan")))]
    curve += [(r["step"], r["val_acc"], r["val_blank_prior_acc"], r.get("val_look_rate", float("nan")))
              for r in rows if "val_acc" in r]
    run = dict(acc=last["val_acc"], first=last["val_step_acc"][0], middle=last["val_step_acc"][1],
               last=last["val_step_acc"][2], blank_prior=last["val_blank_prior_acc"],
               copy_share=last["val_late_copy_share"], rho_start=start["focus_dependence_spearman"],
               rho_end=end["focus_dependence_spearman"], start_acc=rows[0]["start_val_acc"],
               start_steps=rows[0]["start_val_step_acc"], minutes=sum(r["time"] for r in rows) / 60,
               curve=curve, steps=last["val_step_acc"], step_focus=last["val_step_focus"],
               start_step_focus=rows[0]["start_val_step_focus"])
    if task == "look":
        # looking is learned in a few dozen steps, so how fast matters as much as where a run
        # ends: held-out accuracy at steps 5 and 10, and its mean over every validation
        at = {r["step"]: r["val_acc"] for r in rows if "val_acc" in r}
        # sampled, as RL samples: a late step that looks 3 times in 10 never looks greedily
        checked = json.load(open(os.path.join(out, "look_checks.json")))
        sampled = {f"{k}_{when}": checked[when][f"sampled_{k}"] for when in ("start", "end")
                   for k in ("acc", "look_rate", "look_acc", "guess_acc_breaking")}
        # and the training reward of the first 5 steps, sampled on the prior's prompts: every step's,
        # where validation sees only step 5
        run.update(reward_1_5=statistics.mean(r["reward"] for r in rows if 1 <= r.get("step", 0) <= 5),
                   acc_5=at.get(5, float("nan")), acc_10=at.get(10, float("nan")),
                   acc_mean=statistics.mean(at.values()), look_rate_greedy=last["val_look_rate"], **sampled)
    return run


def look_checks(run_dir, prompts=500, samples=2):
    """The look task's sampled figures (tiny.look_checks) of a run's warm start and of its final
    checkpoint, on the first `prompts` validation prompts of its seed, each sampled `samples`
    times at the run's --temperature, as RL samples; written to RUN/look_checks.json. Greedy
    validation cannot show them: a step that looks 3 times in 10 never looks greedily."""
    import config
    import tiny
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    seed = saved["seed"]
    args = config.parse_args(["--task", "look", "--seed", str(seed)])
    for name in ("temperature", "top_p", "max_new_tokens", "instruction"):       # as the run sampled
        setattr(args, name, saved[name])
    # validation's prompts (dataset.open_data: seed + 10_000, drawn without the prior), so that the
    # sampled figures and the greedy log describe the same 500 scenes
    checks = [tiny.look_example(seed + 10_000, i) for i in range(prompts)]
    out = {}
    for when, ckpt in (("start", os.path.join(run_dir, "tiny-init-warm")),
                       ("end", checkpoints.latest_checkpoint(run_dir))):
        model, processor, _ = models.load_model(ckpt, args, torch.device("cpu"))
        torch.manual_seed(seed)                    # the same draws for the warm start and the end
        out[when] = tiny.look_checks(model, processor, checks, args, samples)
    with open(os.path.join(run_dir, "look_checks.json"), "w") as f:
        json.dump(out, f)
    return out


# the columns of section 10's table and the paired differences it prints, by task
FORGETTING_COLUMNS = {
    "colour": [("acc", "held-out acc"), ("first", "step 1 acc"), ("middle", "step 2 acc"),
               ("last", "step 3 acc"), ("blank_prior", "blank-image acc, prior prompts"),
               ("copy_share", "late errors that copy"), ("rho_start", "focus~dependence rho, start"),
               ("rho_end", "rho, end"), ("minutes", "minutes")],
    "look": [("reward_1_5", "training reward, steps 1-5"), ("acc_5", "held-out acc, step 5"),
             ("acc_10", "step 10"), ("acc", "end"),
             ("acc_mean", "mean over validations"),
             ("acc_end", "sampled acc, end"), ("look_rate_start", "sampled look rate, start"),
             ("look_rate_end", "look rate, end"), ("look_acc_end", "look acc, end"),
             ("guess_acc_breaking_end", "guess acc where the prior misleads, end"),
             ("last", "step 3 acc, end"), ("blank_prior", "blank-image acc, prior prompts"),
             ("rho_start", "focus~dependence rho, start"), ("rho_end", "rho, end"), ("minutes", "minutes")]}
FORGETTING_DIFFERENCES = {"colour": ("acc", "last", "blank_prior", "copy_share", "rho_end"),
                          "look": ("reward_1_5", "acc_5", "acc_10", "acc_mean", "acc", "acc_end",
                                   "look_rate_end", "rho_end")}


def forgetting(seeds, runs_dir, jobs, steps=None, val_size=500, arms=None, task="colour"):
    import shutil
    import config
    import parallel
    import tiny
    steps = steps if steps is not None else (30 if task == "look" else 150)
    # the look task's folders are named apart, so that one --runs_dir holds both experiments
    tag = "" if task == "colour" else f"{task}-"
    # each seed's warm start once; every arm of the seed starts from a copy of it (paired)
    for seed in range(seeds):
        warm = os.path.join(runs_dir, f"{tag}warm-{seed}")
        if not os.path.exists(os.path.join(warm, "tiny-init-warm", "model.safetensors")):
            tiny.starting_model(config.parse_args(["--seed", str(seed), "--out_dir", warm, "--task", task]),
                                parallel.Ranks())
    slug = lambda arm: tag + arm.lower().replace(", ", "-").replace(" ", "-")
    arms = {arm: FORGETTING_ARMS[arm] for arm in (arms or FORGETTING_ARMS)}
    todo = [(arm, seed) for seed in range(seeds) for arm in arms
            if not os.path.exists(os.path.join(runs_dir, f"{slug(arm)}-{seed}", "eval_done"))]
    # the CPU's threads shared out between the runs at once, so they do not oversubscribe it
    threads = max(1, max(2, torch.get_num_threads()) // jobs)
    runs = []
    for arm, seed in todo:
        out = os.path.join(runs_dir, f"{slug(arm)}-{seed}")
        for part in ("tiny-init", "tiny-init-warm"):
            if not os.path.exists(os.path.join(out, part)):
                shutil.copytree(os.path.join(runs_dir, f"{tag}warm-{seed}", part), os.path.join(out, part))
        # 500 held-out prompts, validated every 50 steps (every 5 on the look task's 30); then
        # eval.py scores the warm start and the final checkpoint with --focus (the focus / image
        # dependence correlation), and on the look task look_checks samples both
        every = "5" if task == "look" else "50"
        train_flags = ["--task", task, "--val_size", str(val_size), "--val_every", every,
                       "--max_steps", str(steps), *arms[arm]]
        then = f"{sys.executable} bench.py --look_checks {out}" if task == "look" else ""
        runs.append((f"{arm} seed {seed}", out,
                     train_then_eval(out, seed, train_flags, "--focus", first=f"{out}/tiny-init-warm",
                                     then=then)))
    run_all(runs, jobs, threads)
    results = {arm: [forgetting_run(os.path.join(runs_dir, f"{slug(arm)}-{s}"), task) for s in range(seeds)]
               for arm in arms}
    columns = FORGETTING_COLUMNS[task]
    print(f"\nthe {task} task, {seeds} seeds per arm, {steps} steps, {val_size} held-out prompts: "
          f"mean ± sd over seeds")
    print("warm start per seed (held-out acc; step acc red/green/blue): " + "; ".join(
        f"{s}: {r['start_acc']:.3f} ({'/'.join(f'{a:.2f}' for a in r['start_steps'])})"
        for s, r in enumerate(next(iter(results.values())))))
    print("| arm | " + " | ".join(name for _, name in columns) + " |\n|" + "---|" * (len(columns) + 1))
    for arm, runs in results.items():
        print(f"| {arm} | " + " | ".join(mean_sd([r[k] for r in runs]) for k, _ in columns) + " |")
    # paired by seed: the difference of each seed's two runs, its mean and standard error;
    # a difference counts only beyond twice its standard error
    print("\npaired differences (mean over seeds ± standard error; * = beyond 2 standard errors)")
    for a, b in (("VGPO", "DAPO"), ("VGPO", "VGPO, focus shuffled"), ("VGPO", "VGPO, phi a mean")):
        if a not in results or b not in results:
            continue
        parts = []
        for k in FORGETTING_DIFFERENCES[task]:
            d = [x[k] - y[k] for x, y in zip(results[a], results[b]) if x[k] == x[k] and y[k] == y[k]]
            if len(d) < 2:
                parts.append(f"{k} -")
                continue
            mean, se = statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))
            parts.append(f"{k} {mean:+.3f} ± {se:.3f}{' *' if abs(mean) > 2 * se else ''}")
        print(f"{a} - {b}: " + ", ".join(parts))
    figures = ("docs/forgetting.png", "docs/focus_steps.png") if task == "colour" else \
        ("docs/forgetting_look.png", "docs/focus_steps_look.png")
    plot_forgetting(results, figures[0], task)
    plot_chain(results, figures[1], task)
    print(f"wrote {figures[0]} and {figures[1]}")


def plot_chain(results, path, task="colour"):
    """Accuracy and visual focus at each step of the chain: the shared warm start, then each
    arm's final checkpoint, means over seeds. Visual forgetting is a fall along the chain."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    start = next(iter(results.values()))                        # every arm starts from the same one
    lines = [("warm start", "black", [r["start_steps"] for r in start],
              [r["start_step_focus"] for r in start])]
    colours = ("tab:blue", "tab:red", "tab:gray", "tab:green")
    lines += [(arm, colour, [r["steps"] for r in runs], [r["step_focus"] for r in runs])
              for (arm, runs), colour in zip(results.items(), colours) if arm in ("DAPO", "VGPO")]
    for label, colour, acc, focus in lines:
        for ax, values in zip(axes, (acc, focus)):
            ax.plot(["red (1)", "green (2)", "blue (3)"], torch.tensor(values).mean(0), color=colour,
                    marker="o", label=f"{label} ({len(values)} seeds)")
    axes[0].set_ylabel("held-out accuracy of the step")
    # (on the look task the digit in the box, after the notes: it copies the note's count)
    axes[1].set_ylabel("visual focus at the step's digit" + (" in the box" if task == "look" else ""))
    for ax in axes:
        ax.set_xlabel("step of the chain")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(("the embedded default" if task == "colour" else "the look task") +
                 " along its chain: warm start, then VGPO and DAPO after RL")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_forgetting(results, path, task="colour"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (arm, runs), colour in zip(results.items(), ("tab:blue", "tab:red", "tab:gray", "tab:green")):
        steps = [point[0] for point in runs[0]["curve"]]
        for ax, k in zip(axes, (1, 2 if task == "colour" else 3)):
            values = torch.tensor([[p[k] for p in r["curve"]] for r in runs])
            ax.plot(steps, values.mean(0), color=colour, marker="o", label=f"{arm} ({len(runs)} seeds)")
            ax.fill_between(steps, values.min(0).values, values.max(0).values, color=colour, alpha=0.12)
    axes[0].set_ylabel("held-out accuracy (greedy)")
    axes[1].set_ylabel("prior probability of the answer\nwritten to a blank image (0.21: a repeated count)"
                       if task == "colour" else "share of late steps that look (greedy)")
    for ax in axes:
        ax.set_xlabel("RL step (0 = the shared warm start)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(("the embedded default" if task == "colour" else "the look task") +
                 ": DAPO, VGPO and two controls, mean and min-max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# 8. (--credit CKPT ...) where VGPO's weights put the credit, on the colour task. The
#    reward is one number per response; VGPO splits it over tokens by visual focus. On
#    "\boxed{r2g1b3}" we know which tokens decide the reward: the three count digits,
#    and in a wrong answer, the digits that are wrong. So this measures whether ψ (intra)
#    and α (inter) move credit towards them, i.e. whether VGPO has anything to add here.

def credit(ckpt, prompts=128, seed=40000):
    import config
    import train
    args = config.parse_args(["--task", "colour"], "")
    model, processor, _ = models.load_model(ckpt, args, torch.device("cpu"))
    policy = rollout.Policy(model)
    data = dataset.open_data("synthetic", "train", args, seed, prompts)       # held out: its own seed
    examples = [dict(data[i], group=i, row=i) for i in range(prompts)]
    batch, images_per_row, examples, _ = train.encode_examples(processor, examples, args)
    rows = torch.arange(len(examples)).repeat_interleave(args.group_size)      # (n,)
    torch.manual_seed(seed)
    responses, mask, _ = train.sample(policy, processor, batch, images_per_row, rows, args,
                                      torch.device("cpu"))
    texts = processor.batch_decode(torch.where(mask, responses, processor.tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    golds = [examples[r]["answer"] for r in rows.tolist()]
    acc = torch.tensor(train.rewards(texts, golds, args))
    group_ids = rows.clone()
    keep = rollout.informative_groups(acc, group_ids)                        # mixed groups only
    prompts_kept, images_kept = rollout.take_rows(batch, images_per_row, rows[keep])
    roll = rollout.Rollout(prompts_kept, images_kept, responses[keep], mask[keep], acc[keep], group_ids[keep])
    _, focus = train.score_rollouts(policy, roll, args, torch.device("cpu"))
    _, st = train.token_advantages(roll, focus, train.vgpo_switches(args))
    psi, alpha, m = st["psi"], st["alpha"], roll.mask                          # (N, T), (N,), (N, T)

    # which tokens decide the reward: the digits at the count slots of "\boxed{rXgYbZ}"
    # (the character tokenizer puts them at positions 8, 10, 12), and which of them are wrong
    kept_golds = [g for g, k in zip(golds, keep.tolist()) if k]
    kept_texts = [t for t, k in zip(texts, keep.tolist()) if k]
    digit = torch.zeros_like(m)
    wrong_digit = torch.zeros_like(m)
    for i, (text, gold) in enumerate(zip(kept_texts, kept_golds)):
        if text.startswith("\\boxed{") and len(text) >= 13:
            for pos, g in zip((8, 10, 12), gold[1::2]):
                digit[i, pos] = True
                wrong_digit[i, pos] = text[pos] != g
    right = roll.reward.bool()
    mean = lambda x, where: float(x[where].mean()) if where.any() else float("nan")
    other = m & ~digit
    out = dict(
        prompts=prompts, mixed_groups=int(keep.sum()) // args.group_size, responses=int(keep.sum()),
        accuracy=float(acc.mean()),
        # intra: ψ on the deciding tokens vs the rest (ψ averages to 1 over a response)
        psi_digits=mean(psi, digit), psi_other=mean(psi, other),
        psi_wrong_digit=mean(psi, wrong_digit), psi_right_digit_of_wrong=mean(psi, digit & ~wrong_digit
                                                                              & ~right.unsqueeze(1)),
        # inter: α of right vs wrong responses (the gain favours right ones only if > 1)
        alpha_right=mean(alpha, right), alpha_wrong=mean(alpha, ~right),
        # ψ by position, and focus by position, over all kept responses
        psi_by_position=[round(mean(psi[:, t], m[:, t]), 3) for t in range(m.shape[1])],
        focus_by_position=[round(mean(focus[:, t], m[:, t]), 3) for t in range(m.shape[1])],
    )
    # how much of ψ's spread is a fixed pattern over positions (i.e. over the characters of
    # "\boxed{rXgYbZ}", which sit at fixed positions) rather than per-answer evidence
    by_position = torch.tensor([mean(psi[:, t], m[:, t]) for t in range(m.shape[1])])             # (T,)
    pattern = by_position.unsqueeze(0).expand_as(psi)
    out["psi_variance_from_position"] = float(((pattern - psi[m].mean()) ** 2)[m].mean() / psi[m].var())
    # within a group, does the response-level focus tell right from wrong? (what α uses)
    phi = st["phi"]
    ranks = []
    for g in roll.group_ids.unique():
        rows_g = roll.group_ids == g
        if right[rows_g].any() and (~right[rows_g]).any():
            ranks.append(float(phi[rows_g & right].mean() > phi[rows_g & ~right].mean()))
    out["groups_where_right_answers_focus_more"] = statistics.mean(ranks) if ranks else float("nan")
    return out


# ---- section 11 (--recipe paper7b): the counts that set the 7B recipe's GPU time ----

def lock_step_sampling(world, batch, rate, max_tries, rng):
    """Dynamic sampling as it was before pooling: every round each rank draws batch / world
    prompts; a rank that holds its share already throws its slice away unsampled, and the
    rounds go on until every rank is full. Returns (rounds, drawn, sampled, kept, busiest),
    busiest = prompts sampled by the busiest rank, which sets the rollout's time."""
    share = batch // world
    kept = [0] * world
    rounds = drawn = sampled = 0
    # every rank steps with the others until the last one is full (or the tries run out)
    while rounds < max_tries and min(kept) < share:
        rounds += 1
        drawn += batch                              # the whole stream slice, every rank's part
        for r in range(world):
            # a full rank's slice is drawn but never sampled: those prompts are lost to the run
            if kept[r] < share:
                sampled += share
                # each sampled group is informative with probability `rate`; a rank keeps its share
                kept[r] = min(share, kept[r] + sum(rng.random() < rate for _ in range(share)))
    # each rank's own groups were cut into the mini-batches: share / 4 of them in each
    return rounds, drawn, sampled, sum(kept), rounds * share, max(kept), max(kept) // 4


def pooled_sampling(world, batch, rate, max_tries, rng, mini_batches=4):
    """train.collect_rollouts' rule: a round draws train.round_size prompts, rank r samples
    every world-th from the r-th, all of them; the ranks' informative groups pool, and
    parallel.fair_shares gives the shortfall to the ranks holding the fewest (each rank's
    first in stream order). Returns the counts of lock_step_sampling, plus the most groups
    one rank holds in one of the update's mini-batches (cut in stream order), the prompts
    each round drew, and the groups of the busiest rank of each mini-batch, summed."""
    import train

    held, drawn, rounds, busiest, kept, sizes = [0] * world, 0, 0, 0, [], []
    while sum(held) < batch and rounds < max_tries:
        rounds += 1
        # the same functions train.py calls: how many to draw, and which of them to keep
        n = train.round_size(batch - sum(held), sum(held), drawn, batch)
        # each prompt of the round informative with probability `rate`; position p is rank p % world's
        informative = [p for p in range(n) if rng.random() < rate]
        found = [[drawn + p for p in informative if p % world == r] for r in range(world)]
        take = parallel.fair_shares(held, [len(f) for f in found], batch - sum(held))
        kept += [(pos, r) for r in range(world) for pos in found[r][:take[r]]]
        held = [h + t for h, t in zip(held, take)]
        drawn += n
        sizes.append(n)
        busiest += -(-n // world)                   # the ranks with one prompt more
    # the update's mini-batches: the kept groups in stream order, cut into equal parts
    order = [r for _, r in sorted(kept)]
    parts = [order[k * len(order) // mini_batches:(k + 1) * len(order) // mini_batches]
             for k in range(mini_batches)]
    most = max(part.count(r) for part in parts for r in range(world))
    # under FSDP each mini-batch takes as long as its busiest rank's part: their sum sets the update
    update = sum(max(part.count(r) for r in range(world)) for part in parts)
    return rounds, drawn, drawn, sum(held), busiest, max(held), most, sizes, update


def assumed_lengths(rng, spread):
    """One response length, 1-2048 tokens, under an ASSUMED spread (no real rollout of the
    7B policy is at hand): "uniform" over 1-2048, or "lognormal" with a median of 400
    tokens and sigma 0.7 (so about 1 in 100 reaches the 2048 cap)."""
    # uniform: as many short answers as long ones, the widest spread a 2048 cap allows
    if spread == "uniform":
        return rng.randint(1, 2048)
    # lognormal: most answers a few hundred tokens, a long tail of long ones
    return max(1, min(2048, round(rng.lognormvariate(math.log(400), 0.7))))


def padding_table(preset, budget, rng, samples=200):
    """The padded share of the update's tokens, before (micro-batches cut in stream order)
    and after (models.micro_batches: longest first), on one rank's part of a mini-batch;
    and the share of a generate() call's decode row-steps spent on rows already finished. Returns
    the padded tokens a row after, by spread."""
    groups = preset.mini_batch // 8                    # a rank's groups of a mini-batch on 8 ranks
    # the 7B policy's response lengths are unknown here (no GPU, no hub), so two spreads are
    # assumed and said to be: the figures show what the rule saves under each, not a forecast
    print()
    print(f"padding, one rank's {groups} groups x {preset.group_size} of a mini-batch on 8 ranks, "
          f"--micro_batch {preset.micro_batch}, prompts 500-1000 tokens (one length a group), {samples} "
          f"mini-batches; the response lengths are assumed, not measured:")
    print("| response lengths | update padded, before: in order | after: by prompt, then response | "
          "decode row-steps on finished rows, before: one call | after: segments of 256 | rows a call |")
    print("|---|---|---|---|---|---|")
    # the preset's micro-batching: --micro_batch rows each (no token budget)
    args = argparse.Namespace(micro_batch=preset.micro_batch, micro_tokens=0)
    padded = {}                                        # the update's padded tokens a row, after
    for spread in ("uniform", "lognormal"):
        before, after, idle, idle_after, pad_rows = [], [], [], [], []
        for _ in range(samples):
            # a group's 8 rows share their prompt's length; each response has its own
            prompts = [p for p in (rng.randint(500, 1000) for _ in range(groups)) for _ in range(8)]
            responses = [assumed_lengths(rng, spread) for _ in prompts]
            # a rollout of those lengths: left-padded prompts, right-padded responses
            roll = rollout.Rollout(
                prompts={"attention_mask": torch.tensor([[0] * (1000 - p) + [1] * p for p in prompts])},
                images_per_row=torch.ones(len(prompts)), responses=torch.zeros(len(prompts), 2048),
                mask=torch.arange(2048) < torch.tensor(responses)[:, None], reward=torch.zeros(len(prompts)),
                group_ids=torch.arange(len(prompts)) // 8)
            # before: the rows in stream order, a group's rows side by side, cut every 4
            rows = torch.arange(len(prompts))
            before.append(models.padded_share(roll, list(rows.split(preset.micro_batch))))
            after.append(models.padded_share(roll, models.micro_batches(roll, rows, args)))
            # the same share as padded tokens a row: share / (1 - share) of its real tokens
            pad_rows.append(after[-1] / (1 - after[-1]) * (sum(prompts) + sum(responses)) / len(prompts))
            # a generate() call runs until its longest row is done; the others ride along
            call = [assumed_lengths(rng, spread) for _ in range(budget.rows(1000, preset.max_new_tokens))]
            idle.append(1 - sum(call) / decode.row_steps(call, 0))
            # in segments (decode.in_segments), a row that ended leaves at the end of its segment
            idle_after.append(1 - sum(call) / decode.row_steps(call, 256))
        rows_a_call = budget.rows(1000, preset.max_new_tokens)
        print(f"| {spread} | {statistics.mean(before):.1%} | {statistics.mean(after):.1%} | "
              f"{statistics.mean(idle):.1%} | {statistics.mean(idle_after):.1%} | {rows_a_call} |")
        padded[spread] = statistics.mean(pad_rows)
    return padded


def segments_table():
    """One sampling call of 64 rows on a CPU, measured: in one segment and in segments."""
    print()
    print("one sampling call, 8 colour-task prompts x 8, sampled, stopping on 2 frequent ids too (CPU, "
          "median of 3):")
    print("| model | new tokens | segment | mean length | row-steps decoded | finished rows' share "
          "| seconds |")
    print("|---|---|---|---|---|---|---|")
    for size, new, segment in (("tiny", 256, 32), ("mid", 256, 32)):
        r = run_child(f"segments:{size}:{new}:{segment}")
        # the two rows of a case: one call, then segments (their draws differ, their lengths alike)
        for name, width in (("one", "one call"), ("segments", segment)):
            c = r[name]
            print(f"| {size} | {new} | {width} | {c['mean_len']:.1f} | {c['row_steps']:,.0f} | "
                  f"{1 - c['mean_len'] * c['rows'] / c['row_steps']:.1%} | {c['time']:.2f} |")


def shared_prefill_table(preset, budget, n_params):
    """Rows per generate() call of the 7B plan, and one CPU rollout round's time, before and
    after each prompt is prefilled once for its G samples (decode.prefill_once)."""
    import train
    from test_vgpo import qwen25_vl_7b_config

    # before: every row pays a whole prompt's prefill transient, as a static cache still does
    static = train.parse_args(["--preset", "paper7b", "--decode_cache", "static"])
    every_row = models.memory_plan(qwen25_vl_7b_config(), n_params, n_params, static, 8, 80 * 2**30)["budget"]
    print()
    print(f"rows per generate() call, the same plan, + {preset.max_new_tokens} new tokens: every row "
          f"prefilled (before) or each prompt once for its {preset.group_size} samples (after):")
    print("| longest prompt of the call (tokens) | before: every row prefilled | after: a prompt once |")
    print("|---|---|---|")
    for length in (512, 1024, 2048, 4096):
        print(f"| {length} | {every_row.rows(length, preset.max_new_tokens)} | "
              f"{budget.rows(length, preset.max_new_tokens)} |")
    # the time it saves, measured here: the default job's round, and longer responses, where
    # decoding (which sharing does not change) takes a larger part of the round
    print()
    print("one rollout round, 16 colour-task prompts x 8 (CPU seconds, median of 3): every row prefilled "
          "(before) vs each prompt once (after)")
    print("| model | new tokens | prompt tokens | before | after | after / before | samples |")
    print("|---|---|---|---|---|---|---|")
    for size, new in (("tiny", 16), ("tiny", 64), ("mid", 16)):
        r = run_child(f"prefill:{size}:{new}")      # a fresh process per case
        print(f"| {size} | {new} | {r['prompt_len']} | {r['before']:.3f} | {r['after']:.3f} | "
              f"{r['after'] / r['before']:.2f} | {'the same' if r['same'] else 'differ'} |")


def call_seconds(lengths, prompt_len, prompts, prompt_s, fit):
    """Seconds of one generate() call whose rows write `lengths` tokens, decoded in segments
    (decode.in_segments): `prompts` prefills of prompt_s seconds, and every decode step at
    the fit's a + b rows + c cached tokens (ms), each remaining row holding prompt_len + t
    tokens of cache at step t. Returns (seconds, decode steps, row-steps, prefill seconds)."""
    a, b, c = fit
    longest = max(lengths)
    # each row stays until the end of the segment it ended in (their sum is decode.row_steps)
    stays = [min(longest, -(-x // decode.SEGMENT) * decode.SEGMENT) for x in lengths]
    cached = sum(s * prompt_len + s * (s + 1) / 2 for s in stays)
    prefill = prompt_s * prompts
    return prefill + (a * longest + b * sum(stays) + c * cached) / 1e3, longest, sum(stays), prefill


def projected_update(shape, m, u, pooled, prompt_len, pad_per_row, preset, rng, spread):
    """The update's seconds in projection_table, its arithmetic printed: the model FLOPs of the
    busiest rank (m: child_project's parameter counts) at the FLOP/s of the shape's own update
    step (u: child_shape's)."""
    L, spec = prompt_len, SHAPES[shape]
    # each rank scores the groups it holds (2 FLOPs a parameter and token); under FSDP every
    # rank runs as many micro-batches as the busiest, so each mini-batch's busiest part sets
    # the update (6 FLOPs); rows are padded as models.micro_batches pads them (padding_table)
    mean_len = statistics.mean(assumed_lengths(rng, spread) for _ in range(20000))
    scored = G * statistics.mean(r[5] for r in pooled)
    updated = G * statistics.mean(r[8] for r in pooled)
    row = L + mean_len + pad_per_row                        # tokens a row, padding included
    # each image goes through the vision tower once a micro-batch that holds its rows
    passes = -(-G // preset.micro_batch)
    patches = (PROJECTION_SIDES[shape][0] // 14) ** 2 / G   # a row's share of its group's image
    flops = ((2 * scored + 6 * updated) * (m["text_params"] * row + m["lm_head"] * (mean_len + pad_per_row))
             + (2 * scored + 6 * passes * updated) * m["vision_params"] * patches)
    # at the FLOP/s the shape's own update step reached (update_flops; short sequences and
    # fewer layers: a conservative rate for the recipe's long ones)
    rate = update_flops(u) / u["update_s"]
    update_s = flops / rate
    print(f"update: the busiest rank scores {scored:.0f} rows (the groups it holds x {G}) and updates "
          f"{updated:.0f} (each mini-batch's busiest rank, summed), each {L} prompt + {mean_len:.0f} "
          f"response + {pad_per_row:.0f} padded tokens: (2 x {scored:.0f} + 6 x {updated:.0f}) x "
          f"{m['text_params']:.3g} parameters x {row:.0f} tokens (+ lm_head, vision) = {flops:.3g} FLOPs at "
          f"{rate:.3g} FLOP/s (the shape's {spec['update_layers']}-layer update step) = {update_s:.0f} s")
    return update_s


def projection_table(pooled, pad_per_row, preset, rng, spread="lognormal", steps=200):
    """The projected step of the paper's recipe on 8 GPUs, its arithmetic shown: the rollout
    of the busiest rank (the prompts each round drew, per simulated step of `pooled`:
    pooled_sampling on 8 ranks) at the decode and prefill times measured here for the rows a
    call holds, plus validation's share of a step, plus the update at the FLOP/s measured for
    the shape's update step, its rows padded by pad_per_row tokens (padding_table). On a GPU
    the 7B shape; on a CPU the small one, which exercises the arithmetic and forecasts nothing."""
    shape = "7b" if DEVICE.type == "cuda" else "small"
    m, u = run_child(f"project:{shape}"), run_child(f"shape:{shape}:after:vgpo")
    spec, points, R = SHAPES[shape], m["points"], m["rows"]
    print()
    print(f"projected step of the paper's recipe, 8 ranks, from decode, prefill and update measured on "
          f"{DEVICE.type}" + (f" ({torch.cuda.get_device_name()})" if DEVICE.type == "cuda" else "")
          + f", shape {shape}" + ("" if shape == "7b" else
                                  " (a CPU: the arithmetic exercised at a CPU's size, not a GPU forecast)"))
    print("| rows | prompt tokens | cached tokens a step (mean) | prefill, s | decode, ms a step |")
    print("|---|---|---|---|---|")
    # a decode step costs a fixed part (launches, weights read once), a part per row
    # (sampling, the matmuls' rows) and a part per cached token (the KV cache read, and copied
    # as the dynamic cache grows): ms = a + b rows + c cached, fit exactly to the 3 points
    cached = [p["rows"] * (p["prompt_len"] + p["new_tokens"] / 2) for p in points]
    for p, kv in zip(points, cached):
        print(f"| {p['rows']} | {p['prompt_len']} | {kv:,.0f} | {p['prefill_s']:.3f} | {p['ms']:.2f} |")
    a, b, c = torch.linalg.solve(torch.tensor([[1.0, p["rows"], kv] for p, kv in zip(points, cached)],
                                              dtype=torch.float64),
                                 torch.tensor([p["ms"] for p in points], dtype=torch.float64)).tolist()
    print(f"fit: decode ms a step = {a:.3f} + {b:.5f} x rows + {c * 1e3:.5f} x thousand cached tokens"
          + ("" if min(a, b, c) >= 0 else " (a negative term: the points differ by less than their noise)"))
    gpu = known_gpu()
    if gpu:
        # the bandwidth bound at the plan's rows: bf16 weights of the decoder layers and
        # lm_head once a step, plus every cached token's K and V (bf16, every layer)
        t = spec["text"]
        kv_bytes = 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * 2 * (
            t["hidden_size"] // t["num_attention_heads"])
        bound = 1e3 * (2 * (m["text_params"] + m["lm_head"]) + cached[0] * kv_bytes) / gpu[1]
        print(f"decode at {R} rows: {points[0]['ms']:.2f} ms a step against a {bound:.2f} ms bandwidth bound "
              f"(weights and KV cache read once a step): at "
              f"{100 * bound / points[0]['ms']:.0f}% of the bound's speed, "
              f"{1e3 * R / points[0]['ms']:,.0f} tokens/s")
    # ---- the rollout of the busiest rank: every round's calls, under assumed lengths ----
    # every prompt as long as the shorter measured ones; prefill seconds a distinct prompt
    # from the call at R rows (its R / G prompts, each prefilled once)
    L, prompt_s = points[0]["prompt_len"], points[0]["prefill_s"] / (R // G)
    totals, calls, decode_steps, row_steps, prefill = [], 0, 0, 0, 0.0
    for sizes in [r[7] for r in pooled[:steps]]:
        seconds = 0.0
        for n in sizes:
            rows = -(-n // 8) * G                   # the busiest rank's rows this round
            # the round's calls, R rows each but the last; the whole rollout waits for this rank
            for start in range(0, rows, R):
                call = [assumed_lengths(rng, spread) for _ in range(min(R, rows - start))]
                # a group's G rows share one prefill
                s, longest, steps_in, p_s = call_seconds(call, L, len(call) / G, prompt_s, (a, b, c))
                seconds += s
                calls, decode_steps, row_steps, prefill = calls + 1, decode_steps + longest, \
                    row_steps + steps_in, prefill + p_s
        totals.append(seconds)
    k = len(totals)
    rollout_s = statistics.mean(totals)
    # validation every --val_every steps: PAPO_MMK12_test's 2,000 prompts (VGPO.md), a rank's
    # every 8th, greedy, each row its own prompt (prefilled alone), decoded in segments too
    val_rows, val_calls = -(-VAL_PROMPTS // 8), 0
    val_s = 0.0
    for _ in range(20):
        for start in range(0, val_rows, m["val_rows"]):
            call = [assumed_lengths(rng, spread) for _ in range(min(m["val_rows"], val_rows - start))]
            val_s += call_seconds(call, L, len(call), prompt_s, (a, b, c))[0] / 20
            val_calls += 1
    val_step = val_s / preset.val_every
    print(f"rollout, the busiest rank, mean of {k} simulated steps ({spread} response lengths, assumed): "
          f"{calls / k:.2f} calls of at most {R} rows a step; a call: prefill {prefill / calls:.2f} s, "
          f"decode {decode_steps / calls:,.0f} steps and {row_steps / calls:,.0f} row-steps in segments of "
          f"{decode.SEGMENT}; in all {rollout_s:.0f} s a step")
    print(f"validation: {VAL_PROMPTS:,} prompts / 8 ranks = {val_rows} rows a rank in {val_calls / 20:.0f} "
          f"call(s) of at most {m['val_rows']} rows, {val_s:.0f} s every {preset.val_every} steps = "
          f"{val_step:.0f} s a step")
    update_s = projected_update(shape, m, u, pooled, L, pad_per_row, preset, rng, spread)
    total = rollout_s + val_step + update_s
    # what the projection leaves out, said so: none of it is measured here
    print(f"projected step: {rollout_s:.0f} s + {val_step:.0f} s + {update_s:.0f} s = {total / 60:.1f} min; "
          f"not counted: grading, the weight gathers, FSDP's communication, the segments' restarts, prompts "
          f"of unlike lengths in a call, ranks waiting on a slower one in a round, checkpoints")


def recipe_table(steps=2000, rate=0.5, only_projection=False):
    """Section 11: print the counts, before and after, for the paper's recipe, and the step
    they project; only_projection: the sampling, rows and padding counts and the projection,
    without the CPU measurements that do not feed it."""
    import train
    from test_vgpo import qwen25_vl_7b_config

    # the paper's recipe as train.py runs it: 512 prompts a step, at most 4 rounds
    preset = train.parse_args(["--preset", "paper7b"])
    batch, tries = preset.rollout_batch, preset.max_tries
    print(f"dynamic sampling, {batch} prompts a step, keep rate {rate}, --max_tries {tries}, {steps} "
          f"simulated "
          f"steps (each group informative with probability {rate}):")
    print("| ranks | rule | rounds / step | prompts drawn / kept group | drawn, never sampled | full steps "
          "| busiest rank's prompts / step | most groups on one rank | most on one rank in a mini-batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world in (2, 4, 8):
        for name, rule in (("before: lock-step", lock_step_sampling), ("after: pooled", pooled_sampling)):
            # the same random draws for both rules: the difference is the rule's, not the luck's
            rng = random.Random(0)
            runs = [rule(world, batch, rate, tries, rng) for _ in range(steps)]
            if world == 8 and rule is pooled_sampling:
                pooled = runs                        # the projection's rounds, below
            # means over the simulated steps, one per column of the rule's result
            rounds, drawn, sampled, kept, busiest, most, most_mini = (statistics.mean(r[k] for r in runs)
                                                                      for k in range(7))
            full = statistics.mean(r[3] == batch for r in runs)
            print(f"| {world} | {name} | {rounds:.2f} | {drawn / kept:.2f} | {1 - sampled / drawn:.1%} | "
                  f"{full:.1%} | {busiest:.0f} | {most:.1f} (mean {batch // world}) | {most_mini:.1f} "
                  f"(mean {batch // world // 4}) |")

    # rows per generate() call: the 7B shape's memory plan on 80 GB, 8 ranks, --max_new_tokens 2048
    with torch.device("meta"):
        from transformers import Qwen2_5_VLForConditionalGeneration
        shape = Qwen2_5_VLForConditionalGeneration(qwen25_vl_7b_config())          # no memory: meta
        n_params = sum(p.numel() for p in shape.parameters())
    budget = models.memory_plan(qwen25_vl_7b_config(), n_params, n_params, preset, 8, 80 * 2**30)["budget"]
    print()
    print(f"rows per generate() call, Qwen2.5-VL-7B, paper7b on 8 x 80 GB, + {preset.max_new_tokens} new "
          f"tokens "
          f"(room for generation {budget.room / 2**30:.1f} GiB):")
    print("| longest prompt of the call (tokens) | before: --gen_batch 32 | after: from the plan |")
    print("|---|---|---|")
    # before, the preset fixed 32 rows for every call, sized for the longest prompt (4096)
    for length in (512, 1024, 2048, 4096):
        print(f"| {length} | 32 | {budget.rows(length, preset.max_new_tokens)} |")

    # the update's padding and the decode steps of finished rows, under assumed lengths
    padded = padding_table(preset, budget, random.Random(0))
    # the step time those counts give, from decode, prefill and update measured here
    project = lambda: projection_table(pooled, padded["lognormal"], preset, random.Random(1))
    if only_projection:
        return project()
    # what sharing a group's prefill adds to the rows a call holds, and its time on a CPU
    shared_prefill_table(preset, budget, n_params)
    segments_table()

    # FSDP hook calls per decoding step: generate through the FSDP units vs the hook-free twin
    r = run_child("fsdpgen:tiny")
    print()
    print(f"FSDP unit forwards (each with its pre- and post-forward hook) per decoding step, tiny model, "
          f"1 rank: before {r['hooks_fsdp']:.1f}, after {r['hooks_twin']:.1f}; tokens/s plain "
          f"{r['plain']:,.0f}, FSDP units {r['fsdp']:,.0f}, twin {r['twin']:,.0f}; "
          + ("the same samples" if r["same"] else "samples differ"))

    # --decode_cache static compiled: the graphs and breaks of each call, FSDP units vs twin
    print()
    # once per shape means: graphs on the first call of a shape, none on the next calls
    print("--decode_cache static, decode step compiled (CPU, tiny model, 1 rank): new graphs and graph "
          "breaks of each generate() call, 3 calls of 4 rows, then one of 6")
    print("| sampling through | call 1 | call 2 | call 3 | 6 rows |")
    print("|---|---|---|---|---|")
    for which, port in (("fsdp", "29585"), ("twin", "29586")):
        calls = run_child(f"compile:{which}:{port}")
        label = "before: the FSDP units" if which == "fsdp" else "after: the hook-free twin"
        print(f"| {label} | " + " | ".join(f"{c['graphs']} graphs, {c['breaks']} breaks, {c['seconds']:.1f} s"
                                          for c in calls) + " |")

    # peak CPU memory per rank while loading under --fsdp, 2 CPU ranks
    path = bench_model("mid", "load")
    print()
    print("| load under --fsdp, 2 CPU ranks | rank 0 peak | rank 1 peak | rank 1 added by the load |")
    print("|---|---|---|---|")
    # before: every rank reads the checkpoint; after: rank 0 reads it and sends the shards
    for mode in ("before", "after"):
        port = "29583" if mode == "before" else "29584"         # a fresh process group each
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", port, __file__, "--child", f"load:{mode}:{path}"],
                             capture_output=True, text=True,
                             env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
        if out.returncode != 0:
            raise SystemExit(f"bench case load:{mode} failed:\n{out.stderr[-2000:]}")
        # each rank wrote its own file: their stdout lines would interleave
        ranks = [json.load(open(f"{path}.{mode}.{rank}.json")) for rank in (0, 1)]
        mb = lambda x: f"{x / 2**20:,.0f} MB"
        params = ranks[0]["params"]
        label = f"{mode}, {params / 1e6:.0f}M params (fp32 {4 * params / 2**20:,.0f} MB)"
        print(f"| {label} | {mb(ranks[0]['peak'])} | {mb(ranks[1]['peak'])} | "
              f"{mb(ranks[1]['peak'] - ranks[1]['start'])} |")

    project()


if args.shape:
    shape_table(args.shape)
    sys.exit(0)


if args.recipe:
    recipe_table(only_projection=args.recipe == "projection")
    sys.exit(0)


if args.credit:
    for ckpt in args.credit:
        print(ckpt, json.dumps(credit(ckpt)), flush=True)
    sys.exit(0)


if args.vgpo_vs_dapo:
    vgpo_vs_dapo(args.vgpo_vs_dapo, args.runs_dir, args.jobs)
    sys.exit(0)

if args.look_checks:
    for run_dir in args.look_checks:
        print(run_dir, json.dumps(look_checks(run_dir)), flush=True)
    sys.exit(0)

if args.forgetting:
    forgetting(args.forgetting, args.runs_dir, args.jobs, args.forgetting_steps, arms=args.forgetting_arms,
               task=args.forgetting_task)
    sys.exit(0)


rows = []  # (what, fast seconds, slow seconds)

# ---- 1. advantages: vectorised vs per-token loop ----
N, T = args.responses, args.tokens
# 0/1 rewards like the accuracy reward, in groups of G consecutive responses
rewards = torch.randint(0, 2, (N,)).float()
group_ids = torch.arange(N) // args.group_size
# ragged lengths as in a real rollout (responses end at different EOS), the longest
# filling all T positions so the batch really is N x T
lengths = torch.randint(T // 4, T + 1, (N,))
lengths[0] = T
response_mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)     # (N, T)
focus = torch.randn(N, T)
fast = timed(lambda: vgpo.vgpo_advantages(rewards, group_ids, focus, response_mask), args.repeats)
# one timed call of each loop: they are slow enough (the torch-scalar one ~15 s, so not even
# a warm-up) that repeats would add time but no precision
slow = timed(lambda: naive_vgpo_advantages(rewards, group_ids, focus, response_mask), 1)
rows.append((f"vgpo_advantages {N}x{T}, loop on Python floats", fast, slow))
slow = timed(lambda: naive_vgpo_advantages(rewards, group_ids, focus, response_mask,
                                           python_floats=False), 0)
rows.append((f"vgpo_advantages {N}x{T}, loop on torch scalars", fast, slow))

# ---- 2. visual focus: batched matmul vs per-token cosine loop ----
Nf, Tf, P, D = 8, args.focus_tokens, 256, args.hidden
# bf16 states, as the model hands them over under autocast; both sides promote to float32
resp = torch.randn(Nf, Tf, D, dtype=torch.bfloat16)                     # (N, T, D)
prompt = torch.randn(Nf, P, D, dtype=torch.bfloat16)                    # (N, P, D)
image_mask = torch.zeros(Nf, P, dtype=torch.bool)
image_mask[:, 16:16 + 196] = True                                      # a 196-token image
fast = timed(lambda: vgpo.visual_focus(resp, prompt, image_mask), args.repeats)
slow = timed(lambda: naive_visual_focus(resp, prompt, image_mask), 1)
rows.append((f"visual_focus {Nf}x{Tf}, D={D}, cosine loop", fast, slow))

# ---- 2b. grading one rollout round of the colour task: rollout.grade vs the math graders ----
def math_graders(answer, gold):
    """The grading rollout.grade replaced: a pair that is neither the same string nor two
    numbers goes to mathruler, then to math-verify, every time it is seen."""
    from mathruler.grader import grade_answer
    from math_verify import parse, verify
    if answer == gold or grade_answer(answer, gold):
        return True
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${answer}$")))
    except Exception:
        return False


def wrong_chain(gold, rng):
    """A wrong answer to a chain "r2g1b3": 3 times in 4 one count changed ("r2g2b3"), otherwise
    two counts swapped ("r1g2b3"; one count changed where all three are equal)."""
    counts = [gold[1], gold[3], gold[5]]
    a, b = rng.sample(range(3), 2)
    if rng.random() < 0.25 and counts[a] != counts[b]:
        counts[a], counts[b] = counts[b], counts[a]
    else:
        counts[a] = rng.choice([n for n in "123" if n != counts[a]])
    return "".join(f"{c}{n}" for c, n in zip("rgb", counts))


# 64 prompts x 8 responses, as in a round of the default job: 6 in 10 answers right
grade_rng = random.Random(0)
golds = ["".join(f"{c}{grade_rng.randint(1, 3)}" for c in "rgb") for _ in range(64) for _ in range(8)]
answers = [g if grade_rng.random() < 0.6 else wrong_chain(g, grade_rng) for g in golds]


def grade_round():
    rollout._grade_text.cache_clear()           # a fresh cache: the first round of a run
    return [rollout.grade(a, g) for a, g in zip(answers, golds)]


grade_fast = timed(grade_round, args.repeats)
t0 = time.perf_counter()                        # one pass: seconds a pair, so no repeats
by_math = [math_graders(a, g) for a, g in zip(answers, golds)]
grade_slow = time.perf_counter() - t0
accepted_wrong = sum(ok for ok, a, g in zip(by_math, answers, golds) if a != g)

# ---- report: the math ----
# the thread count matters: the vectorised calls use every torch thread, the loops one
print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
      f"torch {torch.__version__}")
print(f"| {'benchmark':<48} | {'vectorised':>11} | {'naive loop':>11} | {'speed-up':>9} |")
print(f"|{'-' * 50}|{'-' * 13}|{'-' * 13}|{'-' * 11}|")
for what, fast, slow in rows:
    print(f"| {what:<48} | {fast * 1e3:>8.2f} ms | {slow * 1e3:>8.1f} ms | {slow / fast:>8.0f}x |")
print()
print(f"| {'grading ' + str(len(golds)) + ' colour answers (one round)':<48} | {'rollout.grade':>13} | "
      f"{'math graders':>12} | {'speed-up':>9} |")
print(f"|{'-' * 50}|{'-' * 15}|{'-' * 14}|{'-' * 11}|")
print(f"| {'time, a fresh cache':<48} | {grade_fast * 1e3:>10.1f} ms | {grade_slow * 1e3:>9.0f} ms | "
      f"{grade_slow / grade_fast:>8.0f}x |")
# the correctness side of the same pairs: a wrong chain graded right is a wrong reward
graded = grade_round()
wrong_right = sum(ok for ok, a, g in zip(graded, answers, golds) if a != g)
n_wrong = sum(a != g for a, g in zip(answers, golds))
label = f"wrong chains graded right, of {n_wrong}"
print(f"| {label:<48} | {wrong_right:>13} | {accepted_wrong:>12} | {'':>9} |")

if args.skip_children:
    sys.exit(0)

# ---- 3. VGPO vs GRPO training step; 5. rollout throughput ----
print()
print(f"| {'training step (128 responses x 64 tokens)':<44} | {'GRPO':>10} | {'VGPO':>10} "
      f"| {'VGPO/GRPO':>9} |")
print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 11}|")
rollout_rows = []
# VGPO/GRPO: the cost of VGPO's extra work (focus scores, token weights) on top of a GRPO
# step; 1.000 would be free
for size in ("tiny", "mid"):
    grpo, vg = run_child(f"step:{size}:grpo"), run_child(f"step:{size}:vgpo")
    label = f"{size} ({vg['params'] / 1e6:.1f}M params)"
    print(f"| {label + ', time':<44} | {grpo['time']:>8.2f} s | {vg['time']:>8.2f} s | "
          f"{vg['time'] / grpo['time']:>9.3f} |")
    print(f"| {label + ', peak memory':<44} | {grpo['peak'] / 2**20:>7.0f} MB | "
          f"{vg['peak'] / 2**20:>7.0f} MB | {vg['peak'] / grpo['peak']:>9.3f} |")
    # sampling does not depend on the method: the GRPO child's rollout speaks for both
    rollout_rows.append((label, grpo["tokens_per_s"]))

# ---- 4. chunked vs full log-prob pass ----
# chunk 0 = one full-logits block; the ratio is the share of its memory the chunks need
full, chunked = run_child("logp:0"), run_child("logp:256")
print()
print(f"| {'log-prob pass, 4 x 1024 tokens, V=152064':<44} | {'full':>10} | {'chunk 256':>10} "
      f"| {'ratio':>9} |")
print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 11}|")
print(f"| {'memory added by forward + backward':<44} | {full['extra'] / 2**20:>7.0f} MB | "
      f"{chunked['extra'] / 2**20:>7.0f} MB | {chunked['extra'] / full['extra']:>9.3f} |")

# ---- 5. rollout throughput ----
print()
for label, tps in rollout_rows:
    print(f"rollout: {label}: {tps:,.0f} generated tokens/s (HF generate, 128 sequences, {DEVICE.type})")

# ---- 6. rollout under FSDP (weights gathered) vs the plain model ----
print()
print(f"| {'rollout, 32 prompts x 64 new tokens, tokens/s':<44} | {'plain':>10} | {'FSDP2':>10} "
      f"| {'ratio':>9} |")
print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 11}|")
for size in ("tiny", "mid"):
    r = run_child(f"fsdpgen:{size}")
    # identical on CPU (fp32 both ways); on GPU the gathered weights are bf16, so samples drift
    # ratio FSDP2 / plain: below 1 is what FSDP's hooks cost a decoding step
    label = f"{size}, 1 rank, " + ("same samples" if r["same"] else "samples differ")
    print(f"| {label + ', through the FSDP units':<44} | {r['plain']:>10,.0f} | {r['fsdp']:>10,.0f} | "
          f"{r['fsdp'] / r['plain']:>9.3f} |")
    print(f"| {label + ', hook-free twin':<44} | {r['plain']:>10,.0f} | {r['twin']:>10,.0f} | "
          f"{r['twin'] / r['plain']:>9.3f} |")
