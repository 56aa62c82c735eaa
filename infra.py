"""
The machinery train.py and eval.py share, kept out of their reading path.

    ---- distributed ----  the process group ("cpu:gloo,cuda:nccl" on GPUs), all-reduces
                           of named values, the data-parallel gradient all-reduce
    ---- FSDP2 ----        sharding, and gathering the full weights for generation
    ---- models ----       loading a checkpoint, and the memory plan checked before it
    ---- data ----         opening a data set, the shared prompt order, start-up checks
    ---- checkpoints ----  atomic writes, complete-or-not, where a resumed run starts
    ---- run services ---- --report_to, and SIGTERM / SIGINT as "save and stop"

Nothing here is the paper's method (vgpo.py) or its rollout (rollout.py); a student can
read train.py without opening this file.
"""

import argparse
import contextlib
import copy
import errno
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import zipfile
from types import SimpleNamespace

import torch
import torch.distributed as dist

import rollout
import tiny


# -----------------------------------------------------------------------------
# ---- distributed ----: one process group for CPU and GPU tensors, collectives by name

def process_group_backend(cuda):
    """The process group's backend for each device type of tensor.

    NCCL has no CPU backend: a collective on a CPU tensor in an NCCL-only group raises "No
    backend type associated with device type cpu". Counters, statistics, gradient norms
    under --fsdp_offload and eval's gathered records live on the CPU, so on GPU machines
    the group is "cpu:gloo,cuda:nccl": torch dispatches each collective by its tensor's
    device, CUDA tensors to NCCL and CPU tensors to gloo, and no call site has to care.
    """
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def setup_distributed():
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain `python train.py` is a world of one."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group(process_group_backend(cuda=True), device_id=torch.device("cuda", local_rank))
        return rank, local_rank, world, torch.device("cuda", local_rank)
    dist.init_process_group(process_group_backend(cuda=False))
    return rank, local_rank, world, torch.device("cpu")


def all_reduce(x, world, op=dist.ReduceOp.SUM):
    """Sum (or max, ...) a tensor over ranks (no-op in a world of one)."""
    if world > 1:
        dist.all_reduce(x, op=op)
    return x


def all_reduce_named(values, world, op=dist.ReduceOp.SUM):
    """Reduce a dict of named numbers over ranks in one call: {"reward_sum": 3.0, ...} -> same keys.

    Every rank must pass the same keys in the same order (they are one float64 tensor).
    """
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    return dict(zip(keys, all_reduce(t, world, op).tolist()))


def all_reduce_grads(params, world, bucket_numel=50_000_000):
    """SUM every gradient over ranks, a few large flat buckets at a time.

    A parameter without gradient on this rank (e.g. the vision tower when this rank's
    prompts have no image) takes part with zeros, so every rank makes the same calls.
    """
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for i, p in enumerate(params):
        bucket.append(p)
        size += p.numel()
        if size >= bucket_numel or i == len(params) - 1:
            flat = torch.cat([q.grad.flatten() for q in bucket])
            dist.all_reduce(flat)
            for q, g in zip(bucket, flat.split([q.numel() for q in bucket])):
                q.grad.copy_(g.view_as(q))
            bucket, size = [], 0


def replica_divergence(params, world):
    """Largest difference between ranks of any parameter's sum: 0 when replicas agree.

    Every rank applies the same all-reduced gradient to the same weights, so anything
    but 0 means a bug (or non-determinism) that would silently split the replicas.
    """
    if world == 1:
        return 0.0
    sums = torch.stack([p.detach().double().sum() for p in params]).cpu()
    hi_lo = torch.stack([sums, -sums])                   # max of -x is -(min of x): one MAX for both
    dist.all_reduce(hi_lo, op=dist.ReduceOp.MAX)
    return float((hi_lo[0] + hi_lo[1]).max())


def peak_memory(device):
    """Peak bytes of this rank so far: allocated on its GPU, else the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024




# -----------------------------------------------------------------------------
# ---- FSDP2 (--fsdp) ----: weights, gradients and optimizer state sharded over the ranks

class Policy(torch.nn.Module):
    """The model behind one forward: policy(fn, *args) runs fn(model, *args).

    FSDP2 does its bookkeeping in the hooks of a module's forward: the root unit (the
    embeddings, lm_head, final norm and the vision patch embedding and merger: every
    weight outside the decoder layers and vision blocks) is gathered there, and the
    gradient reduction of a backward is finished by a callback the root forward installs.
    generate() and rollout.score() call the model's parts in their own ways, so every use
    of the model goes through this forward. Without --fsdp it is a plain pass-through.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def shard(policy, device, offload=False):
    """fully_shard every decoder layer and vision block, then the rest as the root unit.

    On GPU the gathered weights are bf16 (compute) while the shards, the optimizer and the
    gradient reduction stay fp32. Gradients are SUMMED over ranks, as in the
    data-parallel path: the loss is already divided by the global token count.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    options = dict(mp_policy=mixed, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    block_names = set(getattr(policy.model, "_no_split_modules", None) or ())
    blocks = [m for m in policy.model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise SystemExit(f"--fsdp: {type(policy.model).__name__} names no decoder layer / vision block "
                         f"classes (_no_split_modules); run without --fsdp")
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(policy, **options)
    for unit in fsdp_units(policy):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return len(blocks)


def fsdp_units(module):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(policy):
    """Under FSDP: gather every unit's full weights for the block, free them after.

    Used around rollout, scoring and validation. generate() runs a different number of
    forwards on each rank (each stops when its own responses have ended), so gathering
    layer by layer inside it would leave ranks waiting on each other forever; gathered up
    front, its forwards need no communication. Costs one full (bf16 on GPU) copy of the
    weights per rank while it lasts, the same as a plain data-parallel replica.
    """
    units = fsdp_units(policy)
    if not units:
        yield
        return
    policy.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        policy.set_reshard_after_forward(True)
        policy.set_reshard_after_forward(False, recurse=False)  # FSDP's default for the root


def fsdp_probe(processor, data, args):
    """A one-row rollout (the first training prompt with an image, one response token)
    that FSDP ranks with fewer micro-batches run with zero loss (see update_policy). Its
    image makes it run the vision blocks, as every training prompt under --fsdp does."""
    for index in range(min(len(data), 100)):
        try:
            example = data[index]
        except rollout.BadRowError:
            continue
        if example["images"]:
            batch, ipr = rollout.encode_prompts(processor, [example], args.instruction)
            return rollout.Rollout(batch, ipr, responses=torch.tensor([[processor.tokenizer.eos_token_id]]),
                                   mask=torch.ones(1, 1, dtype=torch.bool), acc=torch.zeros(1),
                                   group_ids=torch.zeros(1, dtype=torch.long))
    raise SystemExit(f"--fsdp: none of the first 100 rows of {args.train_data} has an image; under --fsdp "
                     f"every training prompt needs one (see --fsdp in --help)")


# -----------------------------------------------------------------------------
# ---- models ----: loading, and the memory plan checked before loading

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's actual default."""


def pick_attention(requested, device):
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def read_model_config(path, args):
    """A model's config, from a local folder or a hub id, with errors that say which it
    was taken for; a local folder's weight files are checked for truncation first."""
    from transformers import AutoConfig

    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise ValueError(f"{path}: no such folder (a local path; a hub id looks like Qwen/Qwen2.5-VL-7B-Instruct)")
    if os.path.isdir(path):
        for name in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
            problem = safetensors_problem(os.path.join(path, name))
            if problem:
                raise ValueError(f"{os.path.join(path, name)} is {problem}: the model files are damaged; copy or "
                                 f"download them again")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except Exception as e:
        where = "its config.json" if os.path.isdir(path) else \
            "it as a hub id (there is no local folder of that name; offline, give a local folder)"
        raise ValueError(f"{path}: cannot read {where} ({type(e).__name__}: {e})") from None


def load_model(path, args, device, move=True):
    """AutoModelForImageTextToText + AutoProcessor from a hub id or a local folder.

    The model comes on `device`; with move=False (--fsdp) it stays in CPU memory and
    fully_shard moves each rank's shards to the device (no full copy on any GPU).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = read_model_config(path, args)
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None or not 0 <= image_token_id < config.get_text_config().vocab_size:
        raise ValueError(f"{path}: its config has no usable image_token_id ({image_token_id}), so image "
                         f"placeholders cannot be found; use a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint")
    attn = pick_attention(args.attn, device)
    # float32 master weights; on GPU the forward runs under bf16 autocast
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation=attn,
                                                        trust_remote_code=args.trust_remote_code)
    if move:
        model.to(device)
    if getattr(args, "fast_vision", True):
        attn += fast_vision(model, attn)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if args.min_pixels or args.max_pixels:
        size = dict(processor.image_processor.size)
        size["shortest_edge"] = args.min_pixels or size["shortest_edge"]
        size["longest_edge"] = args.max_pixels or size["longest_edge"]
        processor.image_processor.size = size
    return model, processor, attn


# -----------------------------------------------------------------------------
# ---- vision speed ----: the same numbers from far fewer kernel launches
#
# Two rewirings of a loaded Qwen2-VL / Qwen2.5-VL, applied by load_model. Neither changes
# a weight, a state-dict key or a result (tests: ..._per_window_loops_numbers and
# ..._encoded_once_with_the_same_logprobs_...); both only cut how often the vision tower
# runs and in how many pieces. On a 7B-shape step they are the difference between 86,880
# attention calls and a few hundred, and between encoding every image G times and once.

# the vision attention classes whose forward has this signature and these attributes
WINDOWED_ATTENTION = ("Qwen2_5_VLVisionAttention", "VisionAttention")


def windows_in_one_call(attn, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """A Qwen2(.5)-VL vision attention over all of its windows in ONE sdpa call.

    Without flash-attn, transformers runs one attention call per window of every image
    (cu_seqlens marks the windows): a 448x448 image has 16 windows, so 64 images through
    28 windowed blocks are 28,672 tiny calls per forward. Here the windows are padded to
    the longest one and stacked as a batch, with the padding masked out of the keys:
        (S, D) -> q, k, v (W, H, L, d) -> one sdpa -> (S, D)
    Example: windows of 16, 8, 8 and 4 tokens -> a (4, H, 16, d) batch, 28 of its 64 key
    slots masked. Same rotary embedding, scale and projection as the module's own forward.
    """
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    S = hidden_states.shape[0]
    qkv = attn.qkv(hidden_states).reshape(S, 3, attn.num_heads, -1)                    # (S, 3, H, d)
    q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)                                         # (S, H, d) each
    q, k = rotary(q, k, *position_embeddings)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]                                      # (W,) tokens per window
    W, L = lengths.numel(), int(lengths.max())
    window = torch.repeat_interleave(torch.arange(W, device=q.device), lengths)     # (S,) each token's window
    slot = torch.arange(S, device=q.device) - cu_seqlens[:-1].to(q.device)[window]  # (S,) its place in it

    def stack(x):                                            # (S, H, d) -> (W, H, L, d), zeros as padding
        out = x.new_zeros(W, L, *x.shape[1:])
        out[window, slot] = x
        return out.transpose(1, 2)

    # equal windows (a 448x448 image: 16 of 64 tokens) need no mask, so any sdpa kernel can run
    mask = None
    if not bool((lengths == L).all()):
        valid = torch.arange(L, device=q.device) < lengths.unsqueeze(1).to(q.device)    # (W, L) real keys
        mask = valid[:, None, None, :]                                                  # (W, 1, 1, L)
    out = torch.nn.functional.scaled_dot_product_attention(stack(q), stack(k), stack(v), attn_mask=mask,
                                                           scale=attn.scaling)     # (W, H, L, d)
    out = out.transpose(1, 2)[window, slot]                                         # (S, H, d), no padding
    return attn.proj(out.reshape(S, -1))


def vision_windows_in_one_call(model):
    """Give every windowed vision attention of `model` windows_in_one_call as its forward.
    Returns how many modules were rewired (0 for a model without such blocks)."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in WINDOWED_ATTENTION and hasattr(module, "qkv"):
            module.forward = functools.partial(windows_in_one_call, module)
            n += 1
    return n


def distinct_images(pixel_values, grid_thw, lookback=4):
    """Which images of a batch are copies of an earlier one, found by exact comparison.

    A rollout repeats each prompt G times, so its images arrive as A A A B B B ... (or
    A B A B ... for a two-image prompt). Each image is compared, patch by patch, with
    the `lookback` images before it; a copy points to the earlier image, and pointer
    jumping takes every copy to its first occurrence.
    Returns first (n,) long: the index of the first occurrence of each image.
    Example: images A A B A' B, A' == A -> first [0, 0, 2, 0, 2] (A' via the lookback).
    """
    n, dev = grid_thw.shape[0], pixel_values.device
    grid_thw = grid_thw.to(dev)
    patches = grid_thw.prod(dim=1)                                   # (n,) patches per image
    start = patches.cumsum(0) - patches                                      # (n,) first patch of each
    image = torch.repeat_interleave(torch.arange(n, device=dev), patches)    # (P,) image of each patch
    offset = torch.arange(pixel_values.shape[0], device=dev) - start[image]  # (P,) place in its image
    index = torch.arange(n, device=dev)
    parent = index.clone()
    for j in range(min(lookback, n - 1), 0, -1):                             # the nearest copy wins
        other = (index - j).clamp(min=0)                                     # (n,)
        comparable = (index >= j) & (grid_thw[other] == grid_thw).all(dim=1)
        # each patch against the same patch of image i - j (or itself where not comparable)
        partner = torch.where(comparable[image], start[other][image] + offset, offset + start[image])
        same_patch = (pixel_values == pixel_values[partner]).all(dim=1)       # (P,)
        same = torch.ones(n, dtype=torch.bool, device=dev).scatter_reduce(0, image, same_patch, "amin")
        parent = torch.where(comparable & same, other, parent)
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):                 # pointer jumping to the root
        parent = parent[parent]
    return parent


def encode_images_once(model):
    """Make the vision tower encode each distinct image of a forward once.

    The G responses of a prompt share its image, and generation, scoring and the update
    all run on rows repeated G times: without this, every image is encoded G times in each
    of them. Here the model's get_image_features runs the vision tower on the distinct
    images only, then hands each row a view of its image's embeddings. The numbers are the
    same; in the update, the gradient of an image's embeddings is the sum over its copies,
    exactly what encoding each copy would give. Returns False when the model has no
    get_image_features of the Qwen2(.5)-VL form (nothing is changed then).
    """
    inner = getattr(model, "model", None)
    if not hasattr(inner, "get_image_features") or not hasattr(inner, "visual"):
        return False
    original = inner.get_image_features

    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        first = distinct_images(pixel_values, image_grid_thw)                # (n,)
        keep = first == torch.arange(len(first), device=first.device)        # (n,) first occurrences
        if bool(keep.all()):
            return original(pixel_values, image_grid_thw, **kwargs)
        patches = image_grid_thw.prod(dim=1).to(keep.device)
        distinct_grid = image_grid_thw[keep.to(image_grid_thw.device)]
        out = original(pixel_values[keep.repeat_interleave(patches)], distinct_grid, **kwargs)
        position = keep.cumsum(0) - 1                                              # (n,) its place among them
        order = position[first].tolist()
        expand = lambda per_distinct: tuple(per_distinct[i] for i in order)      # a view per image
        if not hasattr(out, "pooler_output"):                 # older transformers: a tuple of tensors
            return expand(out)
        out.pooler_output = expand(out.pooler_output)
        if getattr(out, "deepstack_features", None) is not None:                   # Qwen3-VL
            out.deepstack_features = [expand(f) for f in out.deepstack_features]
        return out

    inner.get_image_features = get_image_features
    return True


def fast_vision(model, attn):
    """Both rewirings above (flash-attn runs the windows as one varlen call already).
    Safe to call again on a deep copy of a rewired model. Returns what it did, for the log."""
    inner = getattr(model, "model", None)
    if inner is not None:
        # a deep copy keeps the original's get_image_features closure (functions are not
        # copied), which would run the original's vision tower: rewire the copy's own
        inner.__dict__.pop("get_image_features", None)
    said = ""
    if "flash" not in attn:
        if vision_windows_in_one_call(model):
            said += ", vision windows in one call"
    if encode_images_once(model):
        said += ", each distinct image encoded once"
    return said


# -----------------------------------------------------------------------------
# ---- sampling weights ----: what generate() reads at every decoded token

def sampling_copy(policy, args):
    """The policy generate() samples with in the data-parallel path (--sample_dtype).

    Decoding is bound by reading the weights: one pass over them per token. Under bf16
    autocast, fp32 master weights are read in fp32 and cast on every matmul; a bf16 copy
    is read once, in half the bytes. The copy is made here once (each fp32 parameter
    swapped for its bf16 value during the deep copy, so there is never a second fp32
    copy) and refreshed from the policy before every rollout (sampling_weights).
    float32: the policy itself. Under --fsdp the gathered weights are bf16 on a GPU
    already (shard's mixed precision), so this is the policy too.
    """
    model = policy.model
    name = args.sample_dtype
    if name == "auto":
        name = "bfloat16" if next(model.parameters()).device.type == "cuda" else "float32"
    if args.fsdp or name == "float32":
        return policy
    dtype = getattr(torch, name)
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    sampler = copy.deepcopy(model, memo).eval()
    if getattr(args, "fast_vision", True):
        fast_vision(sampler, model.config._attn_implementation)
    return Policy(sampler)


@torch.no_grad()
def sampling_weights(s):
    """The sampling policy, with its copy (if any) set to the policy's current weights."""
    if s.sampler is s.policy:
        return s.policy
    for mine, theirs in zip(s.sampler.model.parameters(), s.policy.model.parameters()):
        mine.copy_(theirs)
    return s.sampler


GiB = 2**30


def memory_plan(config, n_params, n_trainable, args, world):
    """Bytes one rank needs, by part, at the longest prompt and response the flags allow.

    static  (always): fp32 master weights, AdamW's two fp32 moments (sharded under FSDP).
    rollout (sampling): the bf16 weights gathered for generate (or autocast's bf16 copies),
            the KV cache of --gen_batch sequences, and prefill's largest transient (one
            decoder layer over every prompt, or one vision block over every image).
    update  (training): fp32 gradients, the activations of one micro-batch (with
            --gradient_checkpointing the input of every layer and block plus one layer
            recomputed), and the logits of one --logp_chunk block.
    The two phases never overlap, so peak = static + max(rollout, update). Generation is
    planned for the larger of sampling and validation (--val_batch, --val_max_new_tokens);
    with --fsdp_offload the static part and the gradients are in CPU memory ("cpu").
    Example: Qwen2.5-VL-7B (8.29B parameters, 28 layers, 4 KV heads of 128): the KV cache
    takes 2 (K, V) x 28 x 4 x 128 x 2 bytes = 56 KiB a token.
    """
    text, vision = config.get_text_config(), config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2      # bf16 K and V
    shards = world if args.fsdp else 1
    seq = args.max_prompt_len + args.max_new_tokens                     # tokens of one sequence, at most
    # generation: sampling (--gen_batch, --max_new_tokens) and greedy validation (--val_*)
    gen_rows = max(args.gen_batch, args.val_batch)
    gen_seq = args.max_prompt_len + max(args.max_new_tokens, args.val_max_new_tokens)
    # vision patches of one prompt: bounded by --max_pixels and by the prompt length (4 per token)
    merge = getattr(vision, "spatial_merge_size", 2)
    patch = getattr(vision, "patch_size", 14)
    patches = 4 * args.max_prompt_len if not args.max_pixels else \
        min(args.max_pixels // patch ** 2, merge ** 2 * args.max_prompt_len)
    v_hidden = getattr(vision, "hidden_size", 0)
    v_mlp = getattr(vision, "intermediate_size", 4 * v_hidden)
    v_depth = getattr(vision, "depth", 0)
    text_layer = text.hidden_size * 10 + 3 * text.intermediate_size  # live values of one layer, per token
    vision_block = v_hidden * 10 + 3 * v_mlp
    mb = args.micro_batch
    if args.gradient_checkpointing:
        saved = mb * (seq * text.hidden_size * text.num_hidden_layers + patches * v_hidden * v_depth)
        activations = 2 * (saved + mb * max(seq * text_layer, patches * vision_block))
    else:
        activations = 2 * mb * (seq * text_layer * text.num_hidden_layers + patches * vision_block * v_depth)
    static = {"weights, fp32 master": 4 * n_params / shards, "AdamW moments, fp32": 8 * n_trainable / shards}
    if args.kl_coef > 0:
        static["reference weights, fp32"] = 4 * n_params / shards
    rollout_phase = {}
    if args.fsdp or getattr(args, "sample_dtype", "auto") != "bfloat16":
        rollout_phase["weights, bf16 for sampling"] = 2 * n_params    # gathered, or autocast's casts
    else:
        static["weights, bf16 sampling copy"] = 2 * n_params           # kept between steps
    rollout_phase.update({
        f"KV cache, {gen_rows} x {gen_seq} tokens (gen_batch, val_batch)": gen_rows * gen_seq * kv_per_token,
        "prefill transient": 2 * gen_rows * max(args.max_prompt_len * text_layer, patches * vision_block),
    })
    update_phase = {
        "gradients, fp32": 4 * n_trainable / shards,
        f"activations, micro_batch {mb} x {seq} tokens": activations,
        f"logits, {args.logp_chunk or seq} positions": 3 * 4 * mb * (args.logp_chunk or seq) * text.vocab_size,
    }
    cpu = {}
    if args.fsdp_offload:           # shards, AdamW state and gradients live in CPU memory instead
        cpu = {k: static.pop(k) for k in list(static)}
        cpu["gradients, fp32"] = update_phase.pop("gradients, fp32")
    peak = sum(static.values()) + max(sum(rollout_phase.values()), sum(update_phase.values()))
    return dict(static=static, rollout=rollout_phase, update=update_phase, cpu=cpu, peak=peak,
                kv_bytes_per_token=kv_per_token)


def format_plan(plan, capacity):
    lines = [f"memory plan per rank (estimate at the longest prompt and response), peak "
             f"{plan['peak'] / GiB:.1f} GiB" + (f" of {capacity / GiB:.1f} GiB" if capacity else " (CPU: not checked)")]
    for phase in ("static", "rollout", "update", "cpu"):
        lines += [f"  {phase:8s} {name}: {size / GiB:.2f} GiB" for name, size in plan[phase].items()]
    return "\n".join(lines)


def check_memory(plan, capacity, args):
    """Stop, with the flag that fixes it, when the plan cannot fit `capacity` bytes."""
    if not capacity or plan["peak"] <= 0.95 * capacity:
        return
    rollout_phase, update_phase = sum(plan["rollout"].values()), sum(plan["update"].values())
    room = 0.95 * capacity - sum(plan["static"].values())
    if rollout_phase >= update_phase:
        per_sequence = sum(v for k, v in plan["rollout"].items() if not k.startswith("weights")) / max(
            args.gen_batch, args.val_batch)
        fits = int((room - plan["rollout"]["weights, bf16 for sampling"]) // per_sequence)
        fix = (f"lower --gen_batch and --val_batch to {2 ** int(math.log2(fits))} (or lower --max_new_tokens / "
               f"--max_prompt_len)"
               if fits >= 1 else "use more ranks with --fsdp, or shorter --max_prompt_len / --max_new_tokens")
    else:
        fix = ("lower --micro_batch (or set --micro_tokens), turn on --gradient_checkpointing, "
               "or lower --logp_chunk")
    raise SystemExit(f"{format_plan(plan, capacity)}\nThis does not fit the device's {capacity / GiB:.1f} GiB: "
                     f"{fix}.")


def plan_memory(path, args, world, device):
    """Count the model's parameters without loading it (meta device), then plan and check."""
    from transformers import AutoModelForImageTextToText

    config = read_model_config(path, args)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=args.trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters()) if args.freeze_vision else 0
    plan = memory_plan(config, n_params, n_params - vision, args, world)
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return plan, capacity


# -----------------------------------------------------------------------------
# ---- the embedded default's starting policy ----: a supervised warm start

def warm_start(model_path, out_path, args, master, batch=64, lr=1e-3, check_every=2, max_steps=300,
               target=0.4):
    """Write `model_path` after a short supervised warm start on the colour task to `out_path`.

    The stand-in for "-Instruct": the paper starts RL from Qwen2.5-VL-7B-Instruct, a policy
    that already answers in the expected format. Here the tiny random model is trained with
    teacher-forced cross-entropy on the task's full solutions ("\\boxed{r2g1b3}" + EOS)
    until it follows the format and its greedy accuracy on 64 held-out examples reaches
    `target` (checked every `check_every` steps): then it stops, clearly imperfect on the
    answer, so that RL has most of the way still to go.

    Deterministic from --seed: it trains on task seed + 20_000 (neither the RL training
    set, seed + 0, nor validation, seed + 10_000) and checks on seed + 30_000, in order,
    after torch.manual_seed(seed). Prompts are built as training builds them
    (rollout.encode_prompts with --instruction), and the loss is -log p from rollout.score,
    the forward RL scores with. Written to a temporary folder, then renamed (atomic);
    skipped when out_path already holds a model. Returns (out_path, steps, accuracy).
    """
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if os.path.exists(os.path.join(out_path, "model.safetensors")):
        with open(os.path.join(out_path, "warm_start.json")) as f:
            info = json.load(f)
        return out_path, info["steps"], info["accuracy"]
    torch.manual_seed(args.seed)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_path)
    tokenizer = processor.tokenizer
    train = tiny.ColourCountingTask(args.seed + 20_000, batch * max_steps)
    checks = [tiny.colour_example(args.seed + 30_000, i) for i in range(64)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    cpu, accuracy = torch.device("cpu"), 0.0
    bar = tqdm(total=max_steps, desc="warm start", unit="step", disable=not master, dynamic_ncols=True)
    for step in range(1, max_steps + 1):
        examples = [train[i] for i in range((step - 1) * batch, step * batch)]
        # the targets: each solution then the EOS, right-padded as rollout.generate returns responses
        targets = [tokenizer(ex["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for ex in examples]
        width = max(map(len, targets))
        responses = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in targets])  # (B, W)
        mask = torch.arange(width) < torch.tensor([len(t) for t in targets]).unsqueeze(1)           # (B, W)
        model.train()
        prompts, _ = rollout.encode_prompts(processor, examples, args.instruction)
        logp, _ = rollout.score(model, prompts, responses, mask)                                    # (B, W)
        loss = -(logp * mask).sum() / mask.sum()           # mean cross-entropy over response tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.update(1)
        if step % check_every == 0:
            model.eval()
            records = rollout.answer_greedily(Policy(model), processor, checks, args.instruction,
                                              max_new_tokens=args.val_max_new_tokens, bare=False, device=cpu)
            accuracy = sum(r["correct"] for r in records) / len(records)
            bar.set_postfix(loss=f"{loss.item():.3f}", held_out_acc=f"{accuracy:.2f}")
            if accuracy >= target:
                break
    bar.close()
    tmp = f"{out_path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "warm_start.json"), "w") as f:
        json.dump(dict(steps=step, accuracy=accuracy, target=target, batch=batch, lr=lr), f)
    os.replace(tmp, out_path)                  # atomic: nobody ever loads half a model
    return out_path, step, accuracy


# -----------------------------------------------------------------------------
# ---- data ----: opening, the order prompts are drawn in, and the checks at start-up

def open_data(source, split, args, seed_offset, size):
    """'synthetic' -> the --task of tiny.py; anything else -> rollout.Rows over a table."""
    if source == "synthetic":
        task = tiny.ColourCountingTask if getattr(args, "task", "count") == "colour" else tiny.CountingTask
        return task(args.seed + seed_offset, 1_000_000 if size < 0 else size)
    table = rollout.load_table(source, split, (args.problem_key, args.answer_key, args.images_key))
    if size > 0:
        table = table.select(range(min(size, len(table))))
    return rollout.Rows(table, source, args.problem_key, args.answer_key, args.images_key,
                        allow_outside=getattr(args, "allow_outside_paths", False))


class PromptStream:
    """Dataset indices in a fresh seeded permutation per epoch, shared by every rank.

    `position` counts the prompts handed out so far, by all ranks together; it is saved
    with each checkpoint so a resumed run continues with the very next prompt.
    Example: 5 rows, take(3) -> [3, 0, 4], take(3) -> [1, 2, <first of epoch 1>].
    """

    def __init__(self, size, seed, position=0):
        self.size, self.seed, self.position = size, seed, position

    def take(self, k):
        out = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.size)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            chunk = order[offset:offset + k - len(out)].tolist()
            out += chunk
            self.position += len(chunk)
        return out


class Subset:
    """The rows `indices` of a dataset, read on demand (the validation rows that passed)."""

    def __init__(self, data, indices):
        self.data, self.indices = data, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return self.data[self.indices[k]]


def checked_validation(data, args, rank, world, master):
    """Read every validation row once at start-up, with the training's skip rules.

    A bad validation row would otherwise surface at the first validation, after steps
    that were never checkpointed. Each rank reads its share; the bad rows are gathered
    so that every rank keeps the same rows (validation shards them by position).
    """
    from tqdm import tqdm
    bad = []
    for i in tqdm(range(rank, len(data), world), desc="checking validation rows", disable=not master, leave=False):
        try:
            data[i]
        except rollout.BadRowError as e:
            bad.append((i, str(e)))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, bad)
        bad = sorted(b for part in parts for b in part)
    if not bad:
        return data
    if not args.skip_bad_rows:
        raise rollout.BadRowError(bad[0][1])
    too_many(f"validation set {args.val_data}", len(bad), len(data), [m for _, m in bad[:5]], args)
    if master:
        print(f"validation: {len(bad)} of {len(data)} rows skipped (--skip_bad_rows), e.g. {bad[0][1]}")
    skip = {i for i, _ in bad}
    return Subset(data, [i for i in range(len(data)) if i not in skip])


def checked_training(data, args, master):
    """Check the text of every training row at start-up (rollout.Rows.scan_text); images
    are checked when a row is drawn. Without --skip_bad_rows the first bad row stops the
    run here; with it, the bad rows are counted (and skipped when drawn)."""
    if not isinstance(data, rollout.Rows):
        return
    bad = data.scan_text()
    if not bad:
        return
    if not args.skip_bad_rows:
        raise rollout.BadRowError(bad[0][1])
    too_many(f"training data {args.train_data}", len(bad), len(data), [m for _, m in bad[:5]], args)
    if master:
        print(f"training data: {len(bad)} of {len(data)} rows have unusable text and will be skipped "
              f"(--skip_bad_rows), e.g. {bad[0][1]}")


def too_many(what, n_bad, n_rows, examples, args):
    """Stop when more than --max_bad_fraction of the rows read were skipped as bad."""
    if n_bad > args.max_bad_fraction * n_rows:
        shown = "\n  ".join(examples)
        raise SystemExit(f"{what}: {n_bad} of {n_rows} rows read are bad, more than --max_bad_fraction "
                         f"{args.max_bad_fraction}. The first ones:\n  {shown}\nFix the data (a data file "
                         f"moved away from its images?) or raise --max_bad_fraction.")


def check_training_data(totals, step_counts, data, args, world):
    """After each step: stop when the step found no usable prompt, or when the share of
    bad rows read so far passes --max_bad_fraction. Decided from all-reduced counts, so
    every rank stops together (and gathers the first bad rows of all ranks)."""
    no_prompt = step_counts["sampled_groups"] == 0
    if not no_prompt and totals["bad_rows"] <= args.max_bad_fraction * totals["drawn"]:
        return
    examples = list(getattr(data, "skipped", []))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, examples)
        examples = [m for part in parts for m in part]
    if no_prompt:
        raise SystemExit(f"{args.train_data}: a step found no usable prompt ({int(step_counts['bad_rows'])} bad rows, "
                         f"{int(step_counts['long_prompts'])} longer than --max_prompt_len {args.max_prompt_len})."
                         + ("\nThe first bad rows:\n  " + "\n  ".join(examples[:5]) if examples else ""))
    too_many(f"training data {args.train_data}", int(totals["bad_rows"]), int(totals["drawn"]), examples[:5], args)


# -----------------------------------------------------------------------------
# ---- checkpoints ----: atomic writes, what counts as complete, where to resume

def checkpoint_dir(out_dir):
    return os.path.join(out_dir, "checkpoints")


def latest_checkpoint(out_dir):
    """The newest complete checkpoint of a run folder, or None (see resume_point)."""
    return resume_point(out_dir)[0]


def safetensors_problem(path):
    """None if a .safetensors file is whole, else what is wrong: its header names the byte
    range of every tensor, so a file cut short by a crash or a full disk shows here."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return "truncated (its header is cut short)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return None if 8 + n + end <= size else f"truncated ({size} of {8 + n + end} bytes)"


def checkpoint_problem(path):
    """None if `path` holds a complete checkpoint as save_checkpoint writes it, else the
    first thing missing or damaged. Cheap: no tensor is loaded."""
    for name in ("config.json", "vgpo_config.json", "training_state.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"no {name}"
    # torch.save writes a zip archive, whose directory is at the very end of the file
    if not zipfile.is_zipfile(os.path.join(path, "training_state.pt")):
        return "training_state.pt is truncated or damaged"
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not shards:
        return "no model weights (*.safetensors)"
    for shard in shards:
        problem = safetensors_problem(os.path.join(path, shard))
        if problem:
            return f"{shard} is {problem}"
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
    for name in sorted((d for d in os.listdir(root) if d.startswith("step_")), reverse=True):
        problem = checkpoint_problem(os.path.join(root, name))
        if problem is None:
            return os.path.join(root, name), notes
        notes.append(f"{os.path.join(root, name)} is incomplete: {problem}")
    return None, notes


def no_space(root, name, needed):
    previous = latest_checkpoint(os.path.dirname(root))
    raise SystemExit(f"no space left on {root}: checkpoint {name} needs about {needed / GiB:.2f} GiB and "
                     f"{shutil.disk_usage(root).free / GiB:.2f} GiB are free. It was not written; "
                     f"{previous or 'no earlier checkpoint'} and `latest` are intact. Free some space (or "
                     f"pass --keep_last N), then continue with --resume.")


def write_checkpoint_files(tmp, policy, processor, optimizer, weights, step, stream, args, last_metrics):
    """Rank 0's part of a checkpoint, written into the temp folder `tmp`."""
    shutil.rmtree(tmp, ignore_errors=True)
    policy.model.save_pretrained(tmp, state_dict=weights)
    processor.save_pretrained(tmp)
    state = {"step": step, "data_position": stream.position, "fsdp": args.fsdp,
             # for inspection: exact resume comes from re-seeding every step by (seed, rank, step)
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
             "last_metrics": last_metrics}
    if not args.fsdp:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, os.path.join(tmp, "training_state.pt"))
    with open(os.path.join(tmp, "vgpo_config.json"), "w") as f:
        json.dump(vars(args), f, indent=2)


def save_checkpoint(policy, processor, optimizer, step, stream, args, last_metrics, rank, world):
    """Write checkpoints/step_XXXXXX atomically (temp dir, then rename), then point
    `latest` at it (temp file, then replace): a crash leaves the previous one intact.

    Every rank calls this. The folder is a plain save_pretrained checkpoint (transformers
    and vLLM load it as it is) plus training_state.pt. Under FSDP the full weights are
    gathered to rank 0 first, and the optimizer state is written sharded, each rank its
    part, to optimizer/ (torch.distributed.checkpoint; it can be resumed on any number
    of ranks). All ranks must see the same --out_dir (a shared filesystem on 2+ nodes).
    """
    master = rank == 0
    root = checkpoint_dir(args.out_dir)
    name = f"step_{step:06d}"
    tmp, final = os.path.join(root, f".tmp_{name}"), os.path.join(root, name)
    os.makedirs(root, exist_ok=True)
    # fp32 weights and AdamW's two fp32 moments: about 12 bytes a parameter. Checked on
    # every rank and agreed on, so that all stop together instead of waiting on a barrier.
    needed = 12 * sum(p.numel() for p in policy.parameters()) * 1.05
    short = all_reduce_named({"short": shutil.disk_usage(root).free < needed}, world, op=dist.ReduceOp.MAX)
    if short["short"]:
        no_space(root, name, needed)
    weights = None
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        weights = {k.removeprefix("model."): v for k, v in weights.items()}   # on rank 0 only
    if master:
        try:
            write_checkpoint_files(tmp, policy, processor, optimizer, weights, step, stream, args, last_metrics)
        except (OSError, RuntimeError) as e:             # torch reports a full disk as "unexpected pos"
            shutil.rmtree(tmp, ignore_errors=True)
            if getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or "No space" in str(e):
                no_space(root, name, needed)
            raise
    if args.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        dist.barrier()                                   # tmp exists
        dcp.save(get_optimizer_state_dict(policy, optimizer), checkpoint_id=os.path.join(tmp, "optimizer"))
        dist.barrier()                                   # every shard is written
    if master:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        if args.keep_last > 0:
            old = sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-args.keep_last]
            for d in old:
                shutil.rmtree(os.path.join(root, d))
    if world > 1:
        dist.barrier()
    return final


def load_optimizer(policy, optimizer, path, args):
    """The optimizer state of checkpoint `path` (written as save_checkpoint writes it)."""
    state = torch.load(os.path.join(path, "training_state.pt"), weights_only=True)
    if args.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        template = get_optimizer_state_dict(policy, optimizer)   # this rank's shards, to be filled
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


def start_or_resume(args, master):
    """The checkpoint to resume from, or None for a fresh run. Refuses whatever could
    overwrite an earlier run's checkpoints or log; clears a crashed save's temp folder."""
    root = checkpoint_dir(args.out_dir)
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    metrics = os.path.join(args.out_dir, "metrics.jsonl")
    has_log = os.path.isfile(metrics) and os.path.getsize(metrics) > 0
    if not args.resume:
        if steps or has_log:
            raise SystemExit(f"{args.out_dir} already holds a run ({len(steps)} checkpoints, metrics.jsonl); pass "
                             f"--resume to continue it or choose another --out_dir (nothing is overwritten)")
        return None
    resume_from, notes = resume_point(args.out_dir)
    if resume_from is None and (steps or has_log):
        found = "\n  ".join(notes) or "no checkpoint was written yet"
        raise SystemExit(f"--resume: {args.out_dir} holds a run but no complete checkpoint:\n  {found}\n"
                         f"Nothing was changed. Restore a checkpoint, or move {args.out_dir} away to start afresh.")
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
# ---- set-up ----: processes, the policy, the data, and the step a resumed run starts at

def setup_run(args, check_same_run):
    """train.py's set-up. Everything the loop needs, as one namespace `s`: ranks, the policy (sharded under
    --fsdp), the optimizer, both data sets (checked), the prompt stream, and the step a
    resumed run continues from (after check_same_run(saved_config, args, path, master) allows
    it). None when a resumed run has nothing left to do."""
    if args.fsdp and "RANK" not in os.environ:
        raise SystemExit("--fsdp shards over the ranks of torchrun: start with `torchrun --nproc_per_node N "
                         "train.py --fsdp ...` (N = 1 is allowed, e.g. with --fsdp_offload)")
    rank, _, world, device = setup_distributed()
    master = rank == 0
    if args.fsdp_offload and device.type != "cuda":
        raise SystemExit("--fsdp_offload moves the shards from GPU to CPU memory; without a GPU they are "
                         "in CPU memory already: drop the flag")
    if args.rollout_batch % world:
        raise SystemExit(f"--rollout_batch {args.rollout_batch} is not divisible by {world} ranks")
    # the same seed on every rank: the tiny model and any random init agree everywhere
    torch.manual_seed(args.seed)
    # the weights generate() reads (sampling_copy), resolved here so that config.json records them
    if args.sample_dtype == "auto":
        args.sample_dtype = "bfloat16" if device.type == "cuda" else "float32"
    elif args.fsdp and args.sample_dtype != ("bfloat16" if device.type == "cuda" else "float32"):
        raise SystemExit(f"--sample_dtype {args.sample_dtype}: under --fsdp the gathered weights are bf16 on "
                         f"a GPU and fp32 on a CPU (FSDP's mixed precision); drop the flag")

    # where the run starts: a new run, or the newest complete checkpoint of this one
    resume_from = start_or_resume(args, master)
    if resume_from:
        with open(os.path.join(resume_from, "vgpo_config.json")) as f:
            check_same_run(json.load(f), args, resume_from, master)
    model_path = args.model
    if args.model == "tiny":                         # the embedded default, built once per out_dir
        model_path = os.path.join(args.out_dir, "tiny-init")
        if master:
            tiny.build_tiny_model(model_path, seed=args.seed)
            # the colour task starts RL from a policy that writes its format, as the paper
            # starts from an -Instruct model: a short supervised warm start (warm_start)
            if args.task == "colour" and args.train_data == "synthetic":
                _, steps, acc = warm_start(model_path, model_path + "-warm", args, master)
                print(f"warm start: {steps} supervised steps, held-out greedy accuracy {acc:.2f}")
        if world > 1:
            dist.barrier()
        if args.task == "colour" and args.train_data == "synthetic":
            model_path += "-warm"                    # the policy and the --kl_coef reference
    # the memory plan comes before loading: a 7B model takes minutes to load, a wrong
    # --gen_batch should not
    plan, capacity = plan_memory(resume_from or model_path, args, world, device)
    if master:
        print(format_plan(plan, capacity))
    check_memory(plan, capacity, args)

    # the policy; the reference (for --kl_coef) is the starting model, never trained
    model, processor, attn = load_model(resume_from or model_path, args, device, move=not args.fsdp)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # training forwards never decode: no KV cache (generate() turns it on for itself)
    model.config.use_cache = False
    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    policy, ref_policy, units = Policy(model), None, 0
    if args.kl_coef > 0:
        ref_model, _, _ = load_model(model_path, args, device, move=not args.fsdp)
        ref_policy = Policy(ref_model.requires_grad_(False))
    if args.fsdp:
        units = shard(policy, device, args.fsdp_offload)
        if ref_policy is not None:
            shard(ref_policy, device, args.fsdp_offload)
    params = [p for p in policy.parameters() if p.requires_grad]      # shards under FSDP
    # AdamW as in the paper (lr 1e-6, weight decay 1e-2 in the preset); its state is fp32
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    # the data, checked before the first step
    train_data = open_data(args.train_data, args.train_split, args, seed_offset=0, size=-1)
    val_data = open_data(args.val_data, args.val_split, args, seed_offset=10_000, size=args.val_size)
    checked_training(train_data, args, master)
    val_data = checked_validation(val_data, args, rank, world, master)
    s = SimpleNamespace(rank=rank, world=world, device=device, master=master, policy=policy,
                        ref_policy=ref_policy, processor=processor, params=params, optimizer=optimizer,
                        train_data=train_data, val_data=val_data, resume_from=resume_from,
                        stream=PromptStream(len(train_data), args.seed), start_step=0, skipped=0,
                        totals=dict(bad_rows=0, drawn=0))   # rows read and skipped by this process
    # The run ends after --max_steps steps, or (--max_steps -1) once --epochs passes of
    # prompts have been DRAWN: dynamic sampling draws more than rollout_batch prompts in a
    # step when groups are filtered out, so an epoch is counted in prompts, not in steps.
    s.total_prompts = math.ceil(args.epochs * len(train_data))
    # a decaying --lr_schedule needs the number of steps; by epochs it is an estimate
    s.total_steps = math.ceil(s.total_prompts / args.rollout_batch) if args.max_steps < 0 else args.max_steps
    if resume_from:
        state = load_optimizer(policy, optimizer, resume_from, args)
        s.start_step, s.stream.position = state["step"], state["data_position"]
        s.skipped = state["last_metrics"].get("skipped_updates", 0)     # a running count in the log
    if finished(args, s, s.start_step):
        if master:
            print(f"{resume_from}: the run is already complete (step {s.start_step}, "
                  f"{s.stream.position} prompts drawn); nothing to do")
        return None
    s.probe = fsdp_probe(processor, train_data, args) if args.fsdp else None
    s.sampler = sampling_copy(policy, args)
    if master:
        start_log(args, s, sum(p.numel() for p in model.parameters()), attn, units)
    return s


def finished(args, s, step):
    """Whether the run is over at `step`: --max_steps steps, or --epochs passes drawn."""
    if args.max_steps < 0:
        return s.stream.position >= s.total_prompts
    return step >= args.max_steps


# -----------------------------------------------------------------------------
# ---- run services ----: metrics to TensorBoard / W&B, stopping on a signal

def start_log(args, s, n_params, attn, units):
    """config.json, metrics.jsonl cut back to the checkpoint's step, and the start-up lines."""
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    # a resumed run redoes the steps after its checkpoint: drop their old log lines (and a
    # line cut off by a crash)
    path = os.path.join(args.out_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f
                     if (row := parse_log_line(ln)) is not None and row["step"] <= s.start_step]
        with open(path, "w") as f:
            f.writelines(lines)
    sharding = f"FSDP2 over {s.world} ranks, {units} units + root" if args.fsdp else "full copy per rank"
    sharding += ", CPU offload" if args.fsdp_offload else ""
    print(f"model {args.model} ({n_params / 1e6:.2f}M params, attention: {attn}, device: {s.device}, "
          f"world: {s.world}, weights: {sharding})")
    print(f"train {args.train_data} ({len(s.train_data)} rows), val {args.val_data} ({len(s.val_data)}); "
          f"VGPO intra={args.intra} inter={args.inter} compensation={args.compensation} gate={args.gate}"
          + (f"; resuming from {s.resume_from}" if s.resume_from else ""))
    # what generate() really does: nothing is inherited from the checkpoint's generation_config
    print(f"sampling: {rollout.describe_sampling(args.temperature, args.top_p)}; validation: "
          f"{rollout.describe_sampling(0, 1.0)}; {args.max_new_tokens} new tokens at most")
    print("config: " + json.dumps(vars(args)))


def print_row(bar, row):
    bar.write(f"step {row['step']:4d} | epoch {row['epoch']:.2f} | acc {row['acc']:.3f} | "
              f"len {row['response_len']:.1f} | groups kept {row['kept_groups']}/{row['sampled_groups']} | "
              f"loss {row.get('loss', float('nan')):+.4f} | "
              + (f"val_acc {row['val_acc']:.3f} | " if "val_acc" in row else "")
              + (f"late/early focus {row['val_focus_ratio']:.2f} | " if "val_focus_ratio" in row else "")
              + f"{row['time']:.1f}s | {row['peak_mem_gb']:.2f} GB")
    if row.get("replica_divergence", 0) > 0:         # every rank applied the same gradient: a bug
        bar.write(f"WARNING: ranks disagree on the weights by {row['replica_divergence']:.3g}")


def teardown():
    """The end of a run under torchrun: wait for every rank, then close the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Reporter:
    """--report_to: each step's metrics also go to TensorBoard or Weights & Biases, on
    rank 0. Neither is required: it is imported only when asked for, and metrics.jsonl
    stays the record that resume and eval.py read."""

    def __init__(self, args, master):
        self.kind = args.report_to if master else "none"
        if self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(os.path.join(args.out_dir, "tensorboard"))
        elif self.kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise SystemExit("--report_to wandb needs the wandb package: pip install wandb") from None
            self.run = wandb.init(project=args.wandb_project, name=os.path.basename(os.path.abspath(args.out_dir)),
                                  dir=args.out_dir, config=vars(args))

    def log(self, row):
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.kind == "tensorboard":
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, row["step"])
            self.writer.flush()
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
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
