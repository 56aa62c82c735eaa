"""
Models: loading a Qwen-VL checkpoint, rewiring its vision tower for speed, and the
memory plan checked before loading. Skip it on a first read.

    ---- loading ----       load_model: hub id or local folder, float32 master weights,
                            flash-attn when present (else sdpa), the processor's pixel bounds
    ---- vision speed ----  speed_up_vision: the vision windows in one attention call, each
                            distinct image encoded once; the same numbers, far fewer launches
    ---- memory plan ----   bytes per rank by part, from the config alone (the meta device),
                            checked against the GPU before minutes are spent loading; and
                            micro_batches, the update's forwards cut to a token budget, by
                            prompt length, then response length
"""

import functools
import json
import math
import os
import sys

import torch

import decode

# -----------------------------------------------------------------------------
# ---- loading ----: a checkpoint's config, weights and processor


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
        raise ValueError(f"{path}: no such folder (a local path; a hub id looks like "
                         f"Qwen/Qwen2.5-VL-7B-Instruct)")
    if os.path.isdir(path):
        for name in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
            problem = safetensors_problem(os.path.join(path, name))
            if problem:
                raise ValueError(f"{os.path.join(path, name)} is {problem}: the model files are damaged; "
                                 f"copy or download them again")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except Exception as e:
        where = "its config.json" if os.path.isdir(path) else \
            "it as a hub id (there is no local folder of that name; offline, give a local folder)"
        raise ValueError(f"{path}: cannot read {where} ({type(e).__name__}: {e})") from None


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


def load_model(path, args, device, move=True, fast_vision=True, weights=True, dtype=torch.float32):
    """AutoModelForImageTextToText + AutoProcessor from a hub id or a local folder.

    The model comes on `device`; with move=False (--fsdp) it stays in CPU memory and
    fully_shard moves each rank's shards to the device (no full copy on any GPU).
    weights=False (--fsdp, every rank but 0): the same model built on the meta device, no
    weight read and no memory, to receive its shards from rank 0 (parallel.shard).
    fast_vision=True rewires the vision tower (speed_up_vision): the same numbers from
    far fewer kernel launches in every forward. dtype: float32 master weights for training;
    eval.py on a GPU loads bfloat16 (no master copy to keep). Returns (model, processor, attention),
    the last a phrase for the start-up line, e.g. "sdpa, each distinct image encoded once".
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    config = read_model_config(path, args)
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None or not 0 <= image_token_id < config.get_text_config().vocab_size:
        raise ValueError(f"{path}: its config has no usable image_token_id ({image_token_id}), so image "
                         f"placeholders cannot be found; use a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint")
    attn = pick_attention(args.attn, device)
    # float32 master weights; on GPU the forward runs under bf16 autocast
    if weights:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                            trust_remote_code=args.trust_remote_code)
    else:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn,
                                                            trust_remote_code=args.trust_remote_code)
        try:                                             # what from_pretrained would have attached
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            model.generation_config = GenerationConfig.from_model_config(config)
    if move:
        model.to(device)
    if fast_vision:
        attn += speed_up_vision(model, attn)
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
    A B A B ... for a two-image prompt). Each image is compared, patch by patch, with the
    image j before it, j = 1 .. `lookback`, nearest first; a copy points to the earlier image,
    and pointer jumping takes every copy to its first occurrence. Only the images still
    without an earlier copy go on to the next j, so a rollout's pixels are read about once
    (all but the first copy match at j = 1), not `lookback` times.
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
    unmatched = torch.ones(n, dtype=torch.bool, device=dev)                  # no earlier copy found yet
    for j in range(1, min(lookback, n - 1) + 1):                             # the nearest copy wins
        other = (index - j).clamp(min=0)                                     # (n,)
        candidate = unmatched & (index >= j) & (grid_thw[other] == grid_thw).all(dim=1)
        if j == 1 and bool(candidate[1:].all()) and bool((patches == patches[0]).all()):
            # every image after the first a candidate, all of one size (a synthetic rollout): image
            # i's patches lie exactly one image after image i - 1's, so one shifted comparison
            grid = pixel_values.view(n, int(patches[0]), -1)                     # (n, patches, D)
            same = torch.zeros(n, dtype=torch.bool, device=dev)
            same[j:] = (grid[j:] == grid[:-j]).flatten(1).all(dim=1)
        else:
            mine = candidate[image].nonzero().squeeze(1)                     # (p,) the candidates' patches
            if len(mine) == 0:
                continue
            # each of those patches against the same patch of image i - j
            partner = start[other[image[mine]]] + offset[mine]
            same_patch = (pixel_values[mine] == pixel_values[partner]).all(dim=1)    # (p,)
            same = torch.ones(n, dtype=torch.bool, device=dev)
            same = same.scatter_reduce(0, image[mine], same_patch, "amin")
        match = candidate & same
        parent = torch.where(match, other, parent)
        unmatched &= ~match
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


def rope_index_once(model):
    """Make Qwen2(.5)-VL's get_rope_index (the M-RoPE positions of every prompt, a Python loop
    over rows in transformers) compute a row that repeats the row before it only once.

    A rollout's rows come as A A A B B B ...; a row counts as a repeat when its tokens, its
    attention mask, its token types and the grids of its images all equal the previous
    row's. Videos pass through unchanged. The positions are the same; on the embedded
    default the loop was a tenth of a training step. Returns False when the model has no
    get_rope_index of this form.
    """
    inner = getattr(model, "model", None)
    if not hasattr(inner, "get_rope_index"):
        return False
    original = inner.get_rope_index

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, **kwargs):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        call = lambda keep, grids: original(input_ids[keep], mm_token_type_ids=mm_token_type_ids[keep],
                                            image_grid_thw=grids, video_grid_thw=video_grid_thw,
                                            attention_mask=mask[keep], **kwargs)
        if video_grid_thw is not None or mm_token_type_ids is None or len(input_ids) < 2:
            return original(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                            video_grid_thw=video_grid_thw, attention_mask=attention_mask, **kwargs)
        # a row's images: the runs of image tokens (type 1) among its attended tokens, in order
        kind = mm_token_type_ids if attention_mask is None else mm_token_type_ids * attention_mask
        starts = (kind == 1) & torch.nn.functional.pad(kind[:, :-1] != 1, (1, 0), value=True)     # (B, L)
        images = starts.sum(dim=1).tolist()                                                       # per row
        grids = [] if image_grid_thw is None else list(image_grid_thw.split(images))             # per row
        same = [i > 0 and images[i] == images[i - 1] and torch.equal(grids[i], grids[i - 1])
                for i in range(len(images))] if grids else [i > 0 for i in range(len(images))]
        same = torch.tensor(same, device=input_ids.device)
        same[1:] &= (input_ids[1:] == input_ids[:-1]).all(dim=1) & \
            (mm_token_type_ids[1:] == mm_token_type_ids[:-1]).all(dim=1)
        if attention_mask is not None:
            same[1:] &= (attention_mask[1:] == attention_mask[:-1]).all(dim=1)
        keep = ~same
        if bool(keep.all()):
            return call(keep, image_grid_thw)
        kept_grids = torch.cat([g for g, k in zip(grids, keep.tolist()) if k]) if grids else None
        position_ids, deltas = call(keep, kept_grids)
        source = keep.cumsum(0) - 1                   # each row's distinct row: the last kept at or before it
        return position_ids[:, source], deltas[source]

    inner.get_rope_index = get_rope_index
    return True


def speed_up_vision(model, attn):
    """Both rewirings above (flash-attn runs the windows as one varlen call already).
    Safe to call again on a deep copy of a rewired model. Returns what it did, for the log."""
    inner = getattr(model, "model", None)
    if inner is not None:
        # a deep copy keeps the original's get_image_features closure (functions are not
        # copied), which would run the original's vision tower: rewire the copy's own
        inner.__dict__.pop("get_image_features", None)
        inner.__dict__.pop("get_rope_index", None)
    said = ""
    if "flash" not in attn:
        if vision_windows_in_one_call(model):
            said += ", vision windows in one call"
    if encode_images_once(model):
        said += ", each distinct image encoded once"
    if rope_index_once(model):
        said += ", each distinct prompt's positions computed once"
    return said


# -----------------------------------------------------------------------------
# ---- memory plan ----: what one rank needs, checked before the model is loaded

GiB = 2**30


class GenerationBudget:
    """How many sequences one generate() call may hold, from the memory the plan leaves for
    generation (`room` bytes; None on a CPU, where only --gen_batch bounds a call).

    One row of a call costs its KV cache, (prompt + new tokens) x kv bytes a token, plus its
    part of prefill's transient, prompt tokens x prefill bytes a token. When the `share`
    samples of a prompt are prefilled once (decode.prefill_once: a group's G), a row costs a
    share-th of that transient, and a call holds two prompts' transient more (it may start
    and end inside a group). Rows of a call are padded to its longest prompt, so rows are
    packed shortest prompt first.
    Example (Qwen2.5-VL-7B, paper7b on 8 x 80 GB): about 49 GiB of room, 56 KiB a token of
    KV cache and 181 KiB a prompt token of transient: prefilled once per group of 8, 261 rows
    a call at 1,024-token prompts, 114 at 4,096 (143 and 47 when every row is prefilled).
    """

    def __init__(self, room, kv_per_token, prefill_per_token, cap, per_row=0, share=1):
        self.room, self.kv, self.prefill, self.cap = room, kv_per_token, prefill_per_token, cap
        self.per_row = per_row              # bytes a row costs whatever its length (scoring_bytes)
        self.share = share                  # rows that share one prompt's prefill

    def row_bytes(self, prompt_len, new_tokens):
        return self.kv * (prompt_len + new_tokens) + self.prefill * prompt_len / self.share + self.per_row

    def prefill_bytes(self, rows, prompt_len):
        """Prefill's transient in a call of `rows` rows: a share-th of a prompt's a row, plus
        two prompts' more when shared (a call may start and end inside a group, so it holds at
        most ceil((rows - 1) / share) + 1 < rows / share + 2 distinct prompts)."""
        return self.prefill * prompt_len * (rows / self.share + 2 * (self.share > 1))

    def rows(self, prompt_len, new_tokens, cap=None):
        """Rows a call may hold when its longest prompt has prompt_len tokens (at most cap,
        --gen_batch unless given: validation's is --val_batch)."""
        cap = cap or self.cap
        if self.room is None:
            return cap
        room = self.room - self.prefill_bytes(0, prompt_len)
        return max(0, min(cap, int(room // self.row_bytes(prompt_len, new_tokens))))

    def calls(self, prompt_lens, new_tokens):
        """Rows (indices into prompt_lens) of each generate() call: in their own order when
        one call holds them all, else shortest prompt first, each call as full as fits.
        Example (cap 2, room unbounded): lengths [9, 3, 5] -> [[1, 2], [0]]."""
        lens = torch.as_tensor(prompt_lens)
        if len(lens) == 0:
            return []
        if len(lens) <= self.rows(int(lens.max()), new_tokens):
            return [torch.arange(len(lens))]
        out, current = [], []
        for r in lens.argsort(stable=True).tolist():    # ascending: the newest row is the longest
            if current and len(current) + 1 > self.rows(int(lens[r]), new_tokens):
                out.append(torch.tensor(current))
                current = []
            current.append(r)
        return out + [torch.tensor(current)]


def token_costs(config):
    """(KV-cache bytes a token, prefill-transient bytes a prompt token) of generate() in bf16:
    the two per-token costs of a GenerationBudget. The transient is one decoder layer's live
    values, or one vision block's over the token's patches (at most merge^2 of them)."""
    text, vision = config.get_text_config(), config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2      # bf16 K and V
    v_hidden = getattr(vision, "hidden_size", 0)
    vision_block = v_hidden * 10 + 3 * getattr(vision, "intermediate_size", 4 * v_hidden)
    text_layer = text.hidden_size * 10 + 3 * text.intermediate_size
    return kv_per_token, 2 * max(text_layer, getattr(vision, "spatial_merge_size", 2) ** 2 * vision_block)


def scoring_bytes(config, chunk=512):
    """What the focus / log-prob forward after a greedy call (eval --focus, --val_focus) adds
    per row: the fp32 logits of one `chunk` of positions, about 3 live copies of them.
    Example: Qwen2.5-VL-7B (vocabulary 152,064) -> 0.93 GB a row."""
    return 3 * 4 * chunk * config.get_text_config().vocab_size


def memory_plan(config, n_params, n_trainable, args, world, capacity=0):
    """Bytes one rank needs, by part, at the longest prompt and response the flags allow.

    static  (always): fp32 master weights, AdamW's two fp32 moments (sharded under FSDP).
    rollout (sampling): the bf16 weights gathered for generate (or autocast's bf16 copies),
            the KV cache of one generate() call, and prefill's largest transient (one
            decoder layer over every prompt, or one vision block over every image).
    update  (training): fp32 gradients, the activations of one micro-batch (with
            --gradient_checkpointing the input of every layer and block plus one layer
            recomputed), and the logits of one --logp_chunk block.
    The two phases never overlap, so peak = static + max(rollout, update). With a device's
    `capacity` (bytes), what the static part and the sampling weights leave is generation's
    room: plan["budget"] (GenerationBudget) sizes each call from its actual prompt lengths,
    at most --gen_batch rows; on a CPU (capacity 0) every call holds --gen_batch rows. The
    rollout phase shown is the worst case: the longest prompt and response, sampling's or
    validation's (--val_max_new_tokens). With --fsdp_offload the static part and the
    gradients are in CPU memory ("cpu").
    Example: Qwen2.5-VL-7B (8.29B parameters, 28 layers, 4 KV heads of 128): the KV cache
    takes 2 (K, V) x 28 x 4 x 128 x 2 bytes = 56 KiB a token.
    """
    text, vision = config.get_text_config(), config.vision_config
    kv_per_token, prefill_per_token = token_costs(config)
    shards = world if args.fsdp else 1
    seq = args.max_prompt_len + args.max_new_tokens                     # tokens of one sequence, at most
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
    cpu = {}
    if args.fsdp_offload:           # shards, AdamW state and gradients live in CPU memory instead
        cpu = {k: static.pop(k) for k in list(static)}
    room = None
    if capacity:                    # what the device holds in every phase leaves this to generation
        room = 0.95 * capacity - sum(static.values()) - sum(rollout_phase.values())
    # a group's G samples share their prompt's prefill where generate can (decode.prefill_once)
    share = args.group_size if decode.shares_prefill(config, args.decode_cache) else 1
    budget = GenerationBudget(room, kv_per_token, prefill_per_token, args.gen_batch, share=share)
    # the worst call: the longest prompt with the longest response of sampling or validation
    new = max(args.max_new_tokens, args.val_max_new_tokens)
    rows = max(1, budget.rows(args.max_prompt_len, new)) if capacity else max(args.gen_batch, args.val_batch)
    rollout_phase.update({
        f"KV cache, {rows} x {args.max_prompt_len + new} tokens (the longest call)":
            rows * (args.max_prompt_len + new) * kv_per_token,
        "prefill transient": budget.prefill_bytes(rows, args.max_prompt_len),
    })
    update_phase = {
        "gradients, fp32": 4 * n_trainable / shards,
        f"activations, micro_batch {mb} x {seq} tokens": activations,
        # fp32 logits of one chunk, about 3 live copies of them (logits, softmax, its gradient)
        f"logits, {args.logp_chunk or seq} positions": 3 * 4 * mb * (args.logp_chunk or seq)
        * text.vocab_size,
    }
    if args.fsdp_offload:
        cpu["gradients, fp32"] = update_phase.pop("gradients, fp32")
    peak = sum(static.values()) + max(sum(rollout_phase.values()), sum(update_phase.values()))
    return dict(static=static, rollout=rollout_phase, update=update_phase, cpu=cpu, peak=peak,
                kv_bytes_per_token=kv_per_token, budget=budget)


# the prompt lengths the start-up plan shows rows per call for (and --max_prompt_len)
SHOWN_LENGTHS = (512, 1024, 2048)


def format_plan(plan, capacity, args):
    # a CPU has no fixed capacity to check against (capacity 0): the plan is shown, not enforced
    of = f" of {capacity / GiB:.1f} GiB" if capacity else " (CPU: not checked)"
    lines = [f"memory plan per rank (estimate at the longest prompt and response), peak "
             f"{plan['peak'] / GiB:.1f} GiB" + of]
    for phase in ("static", "rollout", "update", "cpu"):
        lines += [f"  {phase:8s} {name}: {size / GiB:.2f} GiB" for name, size in plan[phase].items()]
    budget = plan["budget"]
    if budget.room is None:
        lines.append(f"  rows per generate() call: --gen_batch {args.gen_batch}")
    else:
        lengths = sorted({n for n in SHOWN_LENGTHS if n < args.max_prompt_len} | {args.max_prompt_len})
        shown = ", ".join(f"{n} -> {budget.rows(n, args.max_new_tokens)}" for n in lengths)
        lines.append(f"  rows per generate() call, by the call's longest prompt (+ {args.max_new_tokens} new "
                     f"tokens; at most --gen_batch {args.gen_batch}): {shown}")
    return "\n".join(lines)


def check_memory(plan, capacity, args):
    """Stop, with the flag that fixes it, when the plan cannot fit `capacity` bytes."""
    longest = (args.max_prompt_len, max(args.max_new_tokens, args.val_max_new_tokens))
    one_row = plan["budget"].rows(*longest) >= 1
    if not capacity or (plan["peak"] <= 0.95 * capacity and one_row):
        return
    if not one_row:
        fix = ("not even one sequence of the longest prompt and response fits a generate() call: use more "
               "ranks with --fsdp (or --fsdp_offload), or lower --max_prompt_len / --max_new_tokens / "
               "--val_max_new_tokens")
    else:
        fix = ("lower --micro_batch (or set --micro_tokens), turn on --gradient_checkpointing, "
               "or lower --logp_chunk")
    raise SystemExit(f"{format_plan(plan, capacity, args)}\nThis does not fit the device's "
                     f"{capacity / GiB:.1f} GiB: {fix}.")


def plan_memory(path, args, world, device):
    """Count the model's parameters without loading it (meta device), then plan and check."""
    from transformers import AutoModelForImageTextToText

    config = read_model_config(path, args)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=args.trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters()) if args.freeze_vision else 0
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return memory_plan(config, n_params, n_params - vision, args, world, capacity), capacity



def check_memory_plan(path, args, ranks):
    """Plan the memory of the model at `path` for these flags, print the plan (rank 0) and
    stop, naming the flag to lower, when it cannot fit the device. Returns the plan's
    GenerationBudget: the rows of each generate() call."""
    import parallel                                     # imported here: parallel imports this file

    # FSDP shards over a node's ranks on several nodes (HSDP), over all of them on one
    plan, capacity = plan_memory(path, args, parallel.shard_group_size(ranks.world), ranks.device)
    if ranks.master:
        print(format_plan(plan, capacity, args))
    check_memory(plan, capacity, args)
    return plan["budget"]


# the update's micro-batches: memory only, the gradient does not depend on them (tested)
def micro_batches(samples, rows, args):
    """Split rows into micro-batches, longest rows first: --micro_batch rows each, or, with
    --micro_tokens, as many rows as fit in that many padded tokens (prompt + response).

    Example (micro_tokens 100): rows of 30, 60, 30 tokens -> [r1], [r0, r2] (2 x 30).
    A micro-batch is padded to its longest prompt plus its longest response, so rows go by
    prompt length, then response length, longest first: a group's rows (one prompt) stay
    together, sorted by response, and the first micro-batch, the largest, shows at once
    whether memory suffices. Gradients do not depend on the split or the order (tested).
    """
    if len(rows) == 0:
        return []
    prompt, response = samples.prompts["attention_mask"].sum(1)[rows], samples.mask.sum(1)[rows]
    # by prompt, then response, longest first; a stable sort keeps ties in their order
    order = (prompt * (int(response.max()) + 1) + response).argsort(descending=True, stable=True)
    rows = rows[order]
    if not args.micro_tokens:
        return list(rows.split(args.micro_batch))
    lengths = (prompt + response)[order].tolist()       # each row's cost: prompt plus response, in tokens
    out, current, longest = [], [], 0
    for r, n in zip(rows.tolist(), lengths):
        # a micro-batch costs its row count times its longest row (everything is padded to it)
        if current and (len(current) + 1) * max(longest, n) > args.micro_tokens:
            out.append(torch.tensor(current))
            current, longest = [], 0
        current.append(r)
        longest = max(longest, n)
    return out + ([torch.tensor(current)] if current else [])


def padded_share(samples, micros):
    """The share of the tokens a list of micro-batches computes that are padding: each is
    padded to its longest prompt plus its longest response (Rollout.micro).
    Example: one micro-batch of responses 10 and 40 after 20-token prompts -> 1 - 90 / 120."""
    prompt, response = samples.prompts["attention_mask"].sum(1), samples.mask.sum(1)
    valid = sum(int((prompt[m] + response[m]).sum()) for m in micros)
    padded = sum(len(m) * (int(prompt[m].max()) + max(1, int(response[m].max()))) for m in micros)
    return 1 - valid / padded
