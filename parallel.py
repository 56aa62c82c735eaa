"""
Processes and collectives: what lets train.py run on many ranks. Skip it on a first read.

    Ranks                  this process's rank, the world, its device, and the sums over ranks
    start_ranks / stop     torchrun's process group ("cpu:gloo,cuda:nccl" on GPUs)
    entering / timed_out   the phase a rank is in, named when a collective times out
    sum_gradients          the data-parallel gradient all-reduce (a no-op under FSDP)
    shard / full_weights   FSDP2 (--fsdp): one unit per decoder layer and vision block, and
                           the full weights gathered once around sampling and scoring
    as_many_passes_as_the_busiest_rank
                           FSDP's rule that every rank runs the same collectives
    sampling_copy          the weights generate() reads: a bf16 copy (--sample_dtype), or
                           under --fsdp a hook-free twin bound to the gathered weights

Two rules shape everything here. Every rank must call the same collectives in the same
order, or the job hangs; and the loss is divided by the global token count, so gradients
are SUMMED over ranks, never averaged.
"""

import contextlib
import copy
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import dataset
import models
import rollout


# -----------------------------------------------------------------------------
# ---- ranks ----: one process group for CPU and GPU tensors, sums by name

def process_group_backend(cuda):
    """The process group's backend for each device type of tensor.

    NCCL has no CPU backend: a collective on a CPU tensor in an NCCL-only group raises "No
    backend type associated with device type cpu". Counters, statistics, gradient norms
    under --fsdp_offload and eval's gathered records live on the CPU, so on GPU machines
    the group is "cpu:gloo,cuda:nccl": torch dispatches each collective by its tensor's
    device, CUDA tensors to NCCL and CPU tensors to gloo, and no call site has to care.
    """
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


@dataclass(frozen=True)
class Ranks:
    """This process among the ranks of the job; a world of one needs no process group.

    Example: plain `python train.py` -> Ranks(rank=0, world=1, device=cpu), where every sum
    below returns its input unchanged.
    """
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        # rank 0 alone prints, writes the logs and the checkpoint folders
        return self.rank == 0

    def reduce(self, x, op=dist.ReduceOp.SUM):
        """A tensor summed (or max-ed, ...) over ranks, in place."""
        # a world of one has no process group: nothing to reduce with
        if self.world > 1:
            dist.all_reduce(x, op=op)
        return x

    def sum_named(self, values, op=dist.ReduceOp.SUM):
        """A dict of named numbers reduced over ranks in one call: {"reward_sum": 3.0} -> same keys.
        Every rank must pass the same keys in the same order: they travel as one float64 tensor."""
        keys = list(values)
        # float64: token counts of a 7B run pass 2**24, where float32 stops counting by ones
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        return dict(zip(keys, self.reduce(t, op).tolist()))

    def max_named(self, values):
        return self.sum_named(values, op=dist.ReduceOp.MAX)

    def gather_lists(self, items):
        """Every rank's list, concatenated in rank order (for the few messages a rank keeps)."""
        if self.world == 1:
            return list(items)
        # objects, not tensors: the messages are strings, pickled by all_gather_object (a few: cheap)
        parts = [None] * self.world
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]


def fair_shares(held, found, need):
    """How many of each rank's new informative groups to keep: `need` in all (or every one
    found, if fewer), given to the ranks holding the fewest so far, so that the update's
    work is spread as evenly as the groups allow (FSDP runs as many passes as the busiest rank).
    Example: held [4, 4], found [3, 1], need 3 -> [2, 1]; held [0, 6], found [5, 5], need 4 -> [4, 0]."""
    take = [0] * len(held)
    for _ in range(min(need, sum(found))):
        # the rank with the fewest groups that still has a new one to give; ties go to the lower rank
        r = min((r for r in range(len(held)) if take[r] < found[r]), key=lambda r: (held[r] + take[r], r))
        take[r] += 1
    return take


def start_ranks(timeout_min=90.0):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain `python train.py` is a world of one.
    timeout_min (--dist_timeout): how long a collective waits for the slowest rank."""
    if "RANK" not in os.environ:
        return Ranks(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])          # this process's GPU on its own node
    PHASE["timeout_min"] = timeout_min
    # torch's default is 30 minutes, which a rank waiting at a round's end for another rank's
    # sampling, or for rank 0 writing a 7B checkpoint, can approach
    timeout = datetime.timedelta(minutes=timeout_min)
    if torch.cuda.is_available():
        # set before the group exists, so that NCCL's communicator is built on this GPU
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # device_id binds the group to the GPU at once instead of at the first collective
        dist.init_process_group(process_group_backend(cuda=True), device_id=device, timeout=timeout)
        return Ranks(rank, world, device)
    dist.init_process_group(process_group_backend(cuda=False), timeout=timeout)
    return Ranks(rank, world, torch.device("cpu"))


# what this rank is doing now, named when a collective times out: a rank that waits is
# never the one that is slow, so the message says where it waited and for how long
PHASE = dict(name="start-up", since=time.time(), timeout_min=90.0)


def entering(name):
    """Mark the start of a phase of the step ("rollout, round 2", "update", "checkpoint")."""
    PHASE.update(name=name, since=time.time())


def timed_out(error):
    """The message for a collective that timed out, naming the phase; None for other errors.
    Gloo raises RuntimeError("... Timed out waiting 5400000ms for recv ..."); NCCL's DistError
    says "timeout" or "Watchdog caught collective operation timeout"."""
    text = str(error)
    collective = isinstance(error, dist.DistError) and "timeout" in text.lower()
    if not dist.is_initialized() or not (collective or "Timed out waiting" in text
                                         or "Watchdog caught collective operation timeout" in text):
        return None
    minutes = (time.time() - PHASE["since"]) / 60
    return (f"rank {dist.get_rank()}: a collective timed out after --dist_timeout {PHASE['timeout_min']:g} "
            f"min, in the phase '{PHASE['name']}' (begun {minutes:.1f} min before). Another rank is slower "
            f"there or has stopped: read its log first. If the phase is only long (a 7B checkpoint, a long "
            f"sampling round), raise --dist_timeout and continue with --resume.\n"
            f"  (the error: {text.strip().splitlines()[0][:300]})")


def stop_ranks():
    """The end of a run under torchrun: wait for every rank, then close the process group."""
    if dist.is_initialized():
        # a rank that left first would make the others' last collective fail
        dist.barrier()
        dist.destroy_process_group()


def sum_gradients(params, ranks, fsdp, bucket_numel=50_000_000):
    """Data parallel: SUM every gradient over ranks, a few large flat buckets at a time.

    Under FSDP the backward has already reduce-scattered them (with the same SUM), so
    there is nothing to do. A parameter without gradient on this rank (e.g. the vision
    tower when this rank's prompts have no image) takes part with zeros, so every rank
    makes the same calls.
    """
    if ranks.world == 1 or fsdp:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # a few large all-reduces instead of one per parameter: each call has a fixed cost, and
    # a 7B model has about 700 parameter tensors; 50M floats is 200 MB of fp32 per bucket
    bucket, size = [], 0
    for i, p in enumerate(params):
        bucket.append(p)
        size += p.numel()
        if size >= bucket_numel or i == len(params) - 1:
            flat = torch.cat([q.grad.flatten() for q in bucket])
            dist.all_reduce(flat)                       # SUM: the loss is already a global token mean
            for q, g in zip(bucket, flat.split([q.numel() for q in bucket])):
                q.grad.copy_(g.view_as(q))
            bucket, size = [], 0


def clip_gradients(params, max_norm):
    """torch's clip_grad_norm_, returning the global norm as a plain tensor: under FSDP
    the norm of sharded gradients is a DTensor, whose full value needs one more reduce."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def replica_divergence(params, ranks):
    """Largest difference between ranks of any parameter's sum: 0 when replicas agree.

    Every rank applies the same all-reduced gradient to the same weights, so anything
    but 0 means a bug (or non-determinism) that would silently split the replicas.
    """
    if ranks.world == 1:
        return 0.0
    # one number per parameter tensor, in float64 so that a one-ulp drift still shows
    sums = torch.stack([p.detach().double().sum() for p in params]).cpu()
    hi_lo = torch.stack([sums, -sums])                   # max of -x is -(min of x): one MAX for both
    dist.all_reduce(hi_lo, op=dist.ReduceOp.MAX)
    return float((hi_lo[0] + hi_lo[1]).max())


def peak_memory(device):
    """Peak bytes of this rank so far: allocated on its GPU, else the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource                                     # POSIX only, and only needed on a CPU
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024    # Linux reports KiB


# -----------------------------------------------------------------------------
# ---- FSDP2 (--fsdp) ----: weights, gradients and optimizer state sharded over the ranks

def shard(policy, device, offload=False, from_rank0=False):
    """fully_shard every decoder layer and vision block, then the rest as the root unit.

    from_rank0 (train.py): only rank 0 holds the weights; every other rank's model is on
    the meta device (models.load_model(weights=False)) and receives its shards from rank 0
    (receive_shards). One read of the checkpoint per job, not one per rank: 8 ranks of a
    7B model would each hold its 33 GB of fp32 in CPU memory at once, 265 GB a node.

    On GPU the gathered weights are bf16 (compute) while the shards, the optimizer and the
    gradient reduction stay fp32. Gradients are SUMMED over ranks, as in the
    data-parallel path: the loss is already divided by the global token count.

    The root unit (embeddings, lm_head, final norm, the vision patch embedding and merger)
    is gathered in the hooks of the root's forward, and the root's forward also installs
    the callback that finishes a backward's gradient reduction. train.py never calls
    policy(...): it calls policy.generate(...) and policy.score(...) (rollout.Policy), so
    both are registered as forward methods (FSDP2's register_fsdp_forward_method, made for
    HF generate()): each call runs the root's pre- and post-forward hooks around it.
    Returns the number of units below the root.
    """
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)

    # bf16 compute, fp32 reduction on a GPU; on a CPU everything stays fp32 (gloo, no bf16 speed-up)
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    options = dict(mp_policy=mixed, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    # the model's own list of blocks that must never be split (e.g. Qwen2_5_VLDecoderLayer and
    # Qwen2_5_VLVisionBlock): one unit each, so one layer's weights are gathered at a time
    block_names = set(getattr(policy.model, "_no_split_modules", None) or ())
    blocks = [m for m in policy.model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise SystemExit(f"--fsdp: {type(policy.model).__name__} names no decoder layer / vision block "
                         f"classes (_no_split_modules); run without --fsdp")
    mesh = node_mesh(device)
    if mesh is not None:                                 # HSDP: shard within a node, replicate across
        options["mesh"] = mesh
    # rank 0's full weights (references, no copy), to be sent to the others once sharded
    full = policy.state_dict() if from_rank0 and dist.get_rank() == 0 else {}
    # inner units first: fully_shard on the root then takes only the weights left over
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(policy, **options)
    if from_rank0:
        receive_shards(policy, full, torch.device("cpu") if offload else device, device)
        del full
    for method in ("generate", "score"):
        register_fsdp_forward_method(policy, method)
    for unit in fsdp_units(policy):
        # the loss is already a global token mean: sum the gradients, never divide by the world
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return len(blocks)


def node_mesh(device):
    """FSDP's device mesh. On one node None: one flat mesh of every rank. On several nodes
    (torchrun's LOCAL_WORLD_SIZE ranks each) HSDP, a 2-D mesh (nodes, ranks per node): the
    weights are sharded over a node's ranks and replicated across nodes, so the gathers and
    reduce-scatters of every micro-batch stay on the node's own links, and only the gradient
    shards of a mini-batch cross the network, as one all-reduce between the node replicas.
    Example: 2 nodes x 8 GPUs -> mesh (2, 8); each rank holds 1/8 of the weights, not 1/16."""
    world = dist.get_world_size()
    per_node = shard_group_size(world)
    if per_node == world:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def shard_group_size(world):
    """The ranks FSDP shards the weights over: all of them on one node, the ranks of one node
    on several (node_mesh); the memory plan divides by this, not by the world."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return world if per_node >= world or world % per_node else per_node


def mesh_shape(policy):
    """(nodes, ranks per node) of an HSDP policy, None for flat FSDP or no FSDP: for the log."""
    params = [p for p in policy.parameters() if hasattr(p, "device_mesh")]
    return tuple(params[0].device_mesh.shape) if params and params[0].device_mesh.ndim == 2 else None


def receive_shards(policy, full, device, compute):
    """Rank 0 sends each weight (`full`, its state dict) and every rank keeps its own shard
    of it; then rank 0's buffers (the rotary frequencies, not in a state dict) go to all.
    The other ranks' shards are on the meta device until here: to_empty gives them memory
    on `device` (the CPU under --fsdp_offload); buffers go to `compute`, the rank's GPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        policy.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(policy, full, options=options)
    for module in policy.modules():
        for name, buffer in module.named_buffers(recurse=False):
            # on the compute device on every rank (fully_shard put rank 0's there; to_empty put
            # an offloading rank's on the CPU), so that one backend carries every broadcast
            module._buffers[name] = buffer = buffer.to(compute)
            dist.broadcast(buffer, src=0)


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
    Without FSDP it does nothing.
    """
    units = fsdp_units(policy)
    if not units:
        yield
        return
    # keep the gathered weights through every forward inside the block, not just the first
    policy.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        # freed even when the block raised: a stray full copy would break the memory plan
        for unit in units:
            unit.reshard()
        policy.set_reshard_after_forward(True)
        policy.set_reshard_after_forward(False, recurse=False)  # FSDP's default for the root


@contextlib.contextmanager
def as_many_passes_as_the_busiest_rank(policy, probe, passes, ranks, logp_chunk):
    """FSDP's equal-collective rule, in one place: wrap a rank's `passes` forward-backward
    passes, and it runs as many as the busiest rank.

    Under FSDP every forward all-gathers and every backward reduce-scatters, collectively,
    so a rank with fewer micro-batches than another (the rollout's groups are not spread
    evenly after filtering) would leave the others waiting forever. The largest count is
    agreed on before the passes, then this rank makes up the difference with passes of
    `probe` (a one-row rollout) whose loss is multiplied by 0: the same collectives, no
    gradient. probe is None without FSDP, and then this does nothing.
    Example: rank 0 has 3 micro-batches, rank 1 has 1 -> rank 1 runs 2 zero-loss passes.
    """
    extra = 0
    if probe is not None:
        # agreed BEFORE the passes: an all-reduce among FSDP's collectives must come at the
        # same place in every rank's sequence of calls
        most = ranks.reduce(torch.tensor(passes), op=dist.ReduceOp.MAX)
        extra = int(most) - passes
    yield
    if extra:
        # the probe's one row, on this rank's device: the cheapest forward that runs every unit
        prompts, responses, mask, _ = probe.micro(torch.arange(1), ranks.device)
    for _ in range(extra):
        with rollout.autocast(ranks.device):
            logp, _ = policy.score(prompts, responses, mask, logp_chunk=logp_chunk)
        (logp.sum() * 0).backward()                     # the same collectives, no gradient


def fsdp_probe(processor, data, args):
    """The one-row rollout of as_many_passes_as_the_busiest_rank: the first training prompt
    with an image, and one response token. Its image makes it run the vision blocks, as
    every training prompt under --fsdp does."""
    # a bad row is no probe; the first 100 rows are enough to find one with an image
    for index in range(min(len(data), 100)):
        try:
            example = data[index]
        except dataset.BadRowError:
            continue
        if example["images"]:
            batch, images_per_row = rollout.encode_prompts(processor, [example], args.instruction)
            return rollout.Rollout(batch, images_per_row,
                                   responses=torch.tensor([[processor.tokenizer.eos_token_id]]),
                                   mask=torch.ones(1, 1, dtype=torch.bool), reward=torch.zeros(1),
                                   group_ids=torch.zeros(1, dtype=torch.long))
    raise SystemExit(f"--fsdp: none of the first 100 rows of {args.train_data} has an image; under --fsdp "
                     f"every training prompt needs one (see --fsdp in --help)")


# -----------------------------------------------------------------------------
# ---- sampling weights ----: what generate() reads at every decoded token

def sampling_copy(policy, args):
    """The policy generate() samples with in the data-parallel path (--sample_dtype).

    Decoding is bound by reading the weights: one pass over them per token. Under bf16
    autocast, fp32 master weights are read in fp32 and cast on every matmul; a bf16 copy
    is read once, in half the bytes. The copy is made here once (each fp32 parameter
    swapped for its bf16 value during the deep copy, so there is never a second fp32
    copy) and refreshed from the policy before every rollout (sampling_weights).
    float32: the policy itself. Under --fsdp: hook_free_twin, the policy's architecture
    without FSDP, into which sampling_weights binds the gathered weights.
    """

    model = policy.model
    name = args.sample_dtype
    # config.check_machine resolves auto for train.py; other callers may still pass it
    if name == "auto":
        name = "bfloat16" if next(model.parameters()).device.type == "cuda" else "float32"
    if args.fsdp:
        return hook_free_twin(policy, args)
    if name == "float32":
        return policy
    dtype = getattr(torch, name)
    # the memo hands deepcopy a bf16 Parameter for every fp32 one: no second fp32 copy
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    # eval(): no dropout while sampling, as in the policy's own no-grad passes
    sampler = copy.deepcopy(model, memo).eval()
    if getattr(args, "fast_vision", True):
        # the copy's vision rewiring must call the copy's own tower (models.speed_up_vision)
        models.speed_up_vision(sampler, model.config._attn_implementation)
    return rollout.Policy(sampler)


def hook_free_twin(policy, args):
    """Under --fsdp: the policy's model built again as a plain module on the meta device,
    holding no memory and no FSDP hooks.

    Every decoded token is a forward through all the FSDP units, and each unit's pre- and
    post-forward hooks run Python on the CPU even when the weights are gathered already: on
    a GPU, where one decode step is a few milliseconds of kernel launches, that adds to every
    token (and the hooks are excluded from torch.compile). The twin decodes the same numbers
    without them: sampling_weights makes its parameters the very tensors that full_weights
    gathered (bf16 on a GPU), so there is no second copy either.
    """
    from transformers import AutoModelForImageTextToText

    model = policy.model
    with torch.device("meta"):
        twin = AutoModelForImageTextToText.from_config(model.config, trust_remote_code=args.trust_remote_code,
                                                       attn_implementation=model.config._attn_implementation)
    twin.generation_config = model.generation_config    # its EOS ids end the responses (rollout.eos_ids)
    if getattr(args, "fast_vision", True):
        models.speed_up_vision(twin, model.config._attn_implementation)
    return rollout.Policy(twin.eval())


def bind_gathered_weights(twin, model):
    """Make every parameter and buffer of `twin` the tensor of the same name in `model`
    (inside full_weights: the gathered, unsharded ones). Tied weights are bound under each
    of their names. Nothing is copied."""
    modules = dict(twin.named_modules())
    for kind, tensors in (("_parameters", model.named_parameters(remove_duplicate=False)),
                          ("_buffers", model.named_buffers(remove_duplicate=False))):
        for name, tensor in tensors:
            owner, _, leaf = name.rpartition(".")
            getattr(modules[owner], kind)[leaf] = tensor


@torch.no_grad()
def sampling_weights(sampler, policy):
    """The sampling policy, with its copy (if any) set to the policy's current weights.
    Under --fsdp call it inside full_weights: the twin takes the gathered weights."""
    if sampler is policy:
        return policy
    if fsdp_units(policy):
        bind_gathered_weights(sampler.model, policy.model)
        return sampler
    # copy_ casts fp32 to bf16 in place: no new tensor, so the copy's memory never grows
    for mine, theirs in zip(sampler.model.parameters(), policy.model.parameters()):
        mine.copy_(theirs)
    return sampler
