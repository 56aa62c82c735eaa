"""
Rollout: prompts + images -> sampled responses -> rewards, and the scoring forward that
turns (prompt, response) pairs into per-token log-probs and visual focus scores.

Read after train.py and vgpo.py, top to bottom (reading and checking the data is in
dataset.py; train.py receives examples {"problem", "answer", "images"}):
  ---- prompts ----    chat template + instruction, processor, left padding; take_rows
                       selects/repeats rows keeping pixel_values in the rows' order
  ---- sampling ----   HF generate with vision/chat-control ids suppressed (a group's
                       prompt prefilled once, decode.py); response mask up to the first EOS
  ---- rewards ----    the last \\boxed{} graded by mathruler / math-verify
  ---- scoring ----    one forward -> log-probs at response positions + focus scores
  ---- the policy ---- policy.generate(...) and policy.score(...): the two calls train.py
                       and eval.py make, the same with or without FSDP
  ---- greedy answers ---- validation's and eval.py's one scorer, and early / late focus
"""

import functools
import math
import re

import torch
import torch.utils.checkpoint
from dataclasses import dataclass
from PIL import Image

import decode
import vgpo

# The instruction appended to every problem, in training and evaluation: PAPO's sentence,
# with which every PAPO_eval question already ends, so that a checkpoint is scored with
# the prompt it was trained on (see has_instruction).
INSTRUCTION = ("You first think through the reasoning process as an internal monologue, enclosed within "
               "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.")


def has_instruction(problem):
    """True if the problem already asks for <think> reasoning and a \\boxed{} answer (every
    PAPO_eval question does): nothing is appended to it then, never a second instruction."""
    return "<think>" in problem and "\\boxed" in problem


# -----------------------------------------------------------------------------
# ---- prompts ----

def build_messages(problem, instruction):
    """One user turn whose content interleaves text and images at the <image> marks.

    Example: "<image>How many?" -> [{"type": "image"}, {"type": "text", "text": "How many? ..."}]
    The instruction is appended unless the problem already carries one (has_instruction).
    """
    text = f"{problem} {instruction}".strip() if instruction and not has_instruction(problem) else problem
    content = []
    for k, piece in enumerate(text.split("<image>")):
        if k > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def autocast(device):
    """bf16 autocast on a GPU (the paper trains in bf16); full fp32 on a CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def encode_prompts(processor, examples, instruction):
    """Chat-template + process a list of examples into one left-padded batch.

    Returns (batch dict of tensors, images_per_row LongTensor (B,)). pixel_values holds
    every image's patches in row order; image_grid_thw one (t, h, w) row per image.
    """
    messages = [build_messages(ex["problem"], instruction) for ex in examples]
    texts = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # every image of the batch in row order: the processor expands each <image> mark in
    # that order, so image k lands in the k-th placeholder
    images = [im for ex in examples for im in ex["images"]]
    # left padding: generate() appends new tokens on the right, after every row's last token
    batch = processor(text=texts, images=images or None, padding=True, padding_side="left",
                      return_tensors="pt")
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return batch, torch.tensor([len(ex["images"]) for ex in examples])


def _ranges(starts, lengths):
    """Concatenated aranges: starts [0, 10], lengths [2, 3] -> [0, 1, 10, 11, 12]."""
    offsets = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths)
    return torch.arange(int(lengths.sum())) + offsets


def take_rows(batch, images_per_row, rows):
    """Select (or repeat) rows of a processed batch, keeping images with their rows.

    rows: LongTensor of row indices, repeats allowed. Per-row tensors are indexed
    directly; image_grid_thw and pixel_values are re-gathered so that the images of each
    output row come in the same order as the rows (the ordering bug that repeating
    pixel_values naively causes). Left padding common to all selected rows is trimmed.
    Example: rows [0, 0, 1, 1] repeats a 2-prompt batch for n = 2 samples each.
    Text-only rows are fine, mixed with image rows or alone.
    """
    rows = torch.as_tensor(rows, dtype=torch.long)
    out = {k: v[rows] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    # rows without any image get no pixel_values at all: an empty tensor fails the forward
    if "image_grid_thw" in batch and images_per_row[rows].sum() > 0:
        # the images of each selected row, row by row: (images of the output,)
        first_image = images_per_row.cumsum(0) - images_per_row
        image_ids = _ranges(first_image[rows], images_per_row[rows])
        patches = batch["image_grid_thw"].prod(dim=1)                    # patches per image
        first_patch = patches.cumsum(0) - patches
        out["image_grid_thw"] = batch["image_grid_thw"][image_ids]
        out["pixel_values"] = batch["pixel_values"][_ranges(first_patch[image_ids], patches[image_ids])]
    # a micro-batch of short prompts should not pay for a long prompt elsewhere in the batch
    pad = int((out["attention_mask"].cumsum(dim=1) == 0).sum(dim=1).min())
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if k in out:
            out[k] = out[k][:, pad:]
    return out, images_per_row[rows]


def concat_prompt_batches(parts, pad_id):
    """Concatenate processed prompt batches: left-pad to one width, keep image order.

    parts: list of (batch, images_per_row). Rows of part 0 come first, then part 1, ...;
    images are concatenated in the same order, so they stay with their rows.
    """
    width = max(b["input_ids"].shape[1] for b, _ in parts)
    out = {}
    keys = dict.fromkeys(k for b, _ in parts for k in b)       # a text-only part has no pixel_values
    for key in keys:
        tensors = [b[key] for b, _ in parts if key in b]
        if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            value = pad_id if key == "input_ids" else 0
            tensors = [torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value) for t in tensors]
        out[key] = torch.cat(tensors)
    return out, torch.cat([images_per_row for _, images_per_row in parts])


def pad_right(tensors, value):
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


# -----------------------------------------------------------------------------
# ---- the rollout: one step's responses on one rank ----

@dataclass
class Rollout:
    """This rank's sampled responses of one step: N rows, G per prompt, a group's rows
    adjacent. Every tensor is on the CPU; a micro-batch moves its rows to the device.

    Example: 2 prompts x G = 8 -> N = 16; group_ids = [5]*8 + [9]*8 (the prompts'
    positions in the stream), responses (16, T) right-padded, mask (16, T).
    A rank whose groups were all filtered out holds Rollout.empty(): zero rows, so it
    runs the same code, and so the same collectives, as every other rank.
    """
    prompts: dict              # the processor's batch, one row per response (pixel_values in row order)
    images_per_row: torch.Tensor          # (N,) images per row; 0 for a text-only prompt
    responses: torch.Tensor    # (N, T) sampled token ids
    mask: torch.Tensor         # (N, T) True up to and including the first EOS
    reward: torch.Tensor       # (N,) the verifiable reward of each response
    group_ids: torch.Tensor    # (N,) the prompt's id: rows with one id form a group
    # filled in later in the step, each (N, T): the sampling policy's log-probs (the PPO
    # ratio's denominator), the reference's (only with --kl_coef) and VGPO's advantages
    old_logp: torch.Tensor = None
    ref_logp: torch.Tensor = None
    adv: torch.Tensor = None

    def __len__(self):
        return len(self.reward)

    @classmethod
    def empty(cls):
        """Zero rows: a (0, 1) mask keeps every shape two-dimensional."""
        return cls(prompts={"input_ids": torch.zeros(0, 1, dtype=torch.long),
                            "attention_mask": torch.zeros(0, 1, dtype=torch.long)},
                   images_per_row=torch.zeros(0, dtype=torch.long),
                   responses=torch.zeros(0, 1, dtype=torch.long),
                   mask=torch.zeros(0, 1, dtype=torch.bool), reward=torch.zeros(0),
                   group_ids=torch.zeros(0, dtype=torch.long))

    @classmethod
    def concat(cls, parts, pad_id):
        """One rollout from the parts kept by several sampling rounds (empty if none)."""
        if not parts:
            return cls.empty()
        # the prompts of every round left-padded to one width, the responses right-padded
        prompts, images_per_row = concat_prompt_batches([(p.prompts, p.images_per_row) for p in parts],
                                                         pad_id)
        return cls(prompts=prompts, images_per_row=images_per_row,
                   responses=pad_right([p.responses for p in parts], pad_id),
                   mask=pad_right([p.mask for p in parts], False),
                   reward=torch.cat([p.reward for p in parts]),
                   group_ids=torch.cat([p.group_ids for p in parts]))

    def first_groups(self, n):
        """The first n rows (whole groups: n is a multiple of G), as a Rollout of their own."""
        rows = torch.arange(n)
        prompts, images_per_row = take_rows(self.prompts, self.images_per_row, rows)
        return Rollout(prompts, images_per_row, self.responses[rows], self.mask[rows], self.reward[rows],
                       self.group_ids[rows])

    def micro(self, rows, device):
        """Prompt batch, responses and mask of some rows, on `device`, trimmed to their
        longest response: a micro-batch of short answers never pays for a long one."""
        prompts, _ = take_rows(self.prompts, self.images_per_row, rows)
        mask = self.mask[rows]
        width = max(1, int(mask.sum(dim=1).max()))
        responses = self.responses[rows, :width].to(device)                 # (n, width)
        return to_device(prompts, device), responses, mask[:, :width].to(device), width


# -----------------------------------------------------------------------------
# ---- sampling ----

def eos_ids(model, processor):
    """Every id that ends a response: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if processor.tokenizer.eos_token_id is not None:
        ids.add(processor.tokenizer.eos_token_id)
    return sorted(ids)


def suppressed_ids(model, processor):
    """Ids a response must never contain: image/video placeholders, vision start/end and
    the other special chat-control tokens (all special added tokens except the EOS ids).

    A sampled image placeholder breaks the next forward ("Image features and image
    tokens do not match"), so these are masked out at sampling time.
    """
    config = model.config
    ids = {getattr(config, k, None) for k in ("image_token_id", "video_token_id",
                                              "vision_start_token_id", "vision_end_token_id")}
    tokenizer = processor.tokenizer
    ids |= set(tokenizer.all_special_ids)
    ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids -= set(eos_ids(model, processor)) | {None}
    vocab = config.get_text_config().vocab_size                # ids past the embedding don't exist
    return sorted(i for i in ids if i < vocab)


def response_mask_from_eos(responses, eos):
    """Valid positions of each response: up to and including its first EOS, by position.

    Pad may equal EOS, so the mask is never built from token values after the first EOS.
    Example: [7, 9, EOS, EOS, EOS] -> [1, 1, 1, 0, 0]; no EOS -> all valid (truncated).
    Returns (mask (B, T) bool, truncated (B,) bool).
    """
    is_eos = torch.isin(responses, torch.as_tensor(eos, device=responses.device))
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), responses.shape[1])  # (B,)
    mask = torch.arange(responses.shape[1], device=responses.device) <= first.unsqueeze(1)
    return mask, ~has_eos


def sampling_settings(temperature, top_p):
    """Every generate() setting that shapes the next-token distribution, given explicitly.

    generate() fills each setting it is not given from the checkpoint's generation_config,
    and Qwen2.5-VL-7B-Instruct ships do_sample true, temperature 0.1, top_p 0.001, top_k 1
    and repetition_penalty 1.05: "temperature 1.0" sampling would silently become greedy
    with a penalty, all G samples of a group identical, every group filtered out. So
    nothing is left to the checkpoint: top-k, min-p and typical-p off, no penalties.
    temperature 0 means greedy (the evaluation protocol), also without a penalty.
    Example: sampling_settings(1.0, 0.99) -> {"do_sample": True, "temperature": 1.0,
             "top_p": 0.99, "top_k": 0, "repetition_penalty": 1.0, ...}
    """
    neutral = dict(top_k=0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                   repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1)
    if temperature > 0:
        return dict(neutral, do_sample=True, temperature=temperature, top_p=top_p)
    return dict(neutral, do_sample=False, temperature=None, top_p=None, top_k=None)


def describe_sampling(temperature, top_p):
    """One line for the start-up log: what generate() will really do."""
    s = sampling_settings(temperature, top_p)
    if not s["do_sample"]:
        return "greedy, repetition_penalty 1.0"
    return (f"temperature {s['temperature']}, top_p {s['top_p']}, top_k off, min_p off, "
            f"repetition_penalty {s['repetition_penalty']}")


@torch.no_grad()
def generate(model, processor, batch, *, max_new_tokens, temperature=1.0, top_p=1.0, cache="dynamic",
             repeats=None, segment=decode.SEGMENT):
    """Sample one response per row of `batch`, or repeats[i] of row i (a group's G samples,
    prefilled once). temperature 0 means greedy. Where it can (decode.shares_prefill), decoding
    goes `segment` new tokens at a time, and rows that finished are dropped between segments.
    cache "static" preallocates the KV cache for prompt + max_new_tokens, which lets
    transformers compile the decode step on a GPU (see --decode_cache). Returns (responses
    (B, T) token ids, response_mask (B, T) bool, truncated (B,) bool), B rows after repeating."""
    eos = eos_ids(model, processor)
    # synced_gpus=False: transformers would keep FSDP ranks generating in lock-step (one
    # all-reduce per token); train.py gathers the full weights first, so each rank stops
    # on its own, as it does without FSDP
    settings = dict(eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id, synced_gpus=False,
                    suppress_tokens=suppressed_ids(model, processor), **sampling_settings(temperature, top_p))
    responses = decode.generate(model, batch, max_new_tokens, settings, cache, repeats, segment)
    mask, truncated = response_mask_from_eos(responses, eos)
    return responses, mask, truncated


# -----------------------------------------------------------------------------
# ---- rewards ----

def last_boxed(text):
    """Content of the last \\boxed{...} (nested braces allowed), or None.

    Example: "so \\boxed{\\frac{1}{2}}." -> "\\frac{1}{2}"
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(response, bare=False):
    """The final answer of a response: its last \\boxed{}, else None.

    bare=True (the synthetic task only) falls back to the last number in the response.
    A randomly initialised model cannot discover the seven characters "\\boxed{" by
    chance, so without this fallback it would never see a reward; real tasks keep the box.
    """
    boxed = last_boxed(response)
    if boxed is not None or not bare:
        return boxed
    numbers = re.findall(r"-?\d+(?:\.\d+)?", response)
    return numbers[-1] if numbers else None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OPTION = re.compile(r"^\(?([A-Z])\)?(?:$|[\s.:)]\s*(.*)$)", re.S)
_LOWER_OPTION = re.compile(r"^\(?([a-z])\)?$")
# a word of letters and digits that has both, e.g. the colour task's chain "r2g1b3": math-verify
# reads it as a product of symbols, r*2*g*1*b*3 = 6rgb, and so accepts "r1g2b3" or "g1r2b3"
_WORD = re.compile(r"(?=.*[A-Za-z])(?=.*\d)[A-Za-z0-9]+")
_LATEX_WRAPPER = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mathbf|rm|bf)\s*\{(.*)\}$", re.S)


def option_letter(answer):
    """The option letter an answer names, or None: "B", "(B)", "B. 12 cm", and the forms
    models write in LaTeX or lower case, "\\text{B}", "\\text{(B)}", "\\mathrm{B}", "b".

    Example: "\\text{(C)}" -> "C"; "NONE" -> None (a word, not a letter); "bb" -> None.
    """
    answer = answer.strip()
    while (wrapped := _LATEX_WRAPPER.match(answer)) is not None:
        answer = wrapped.group(1).strip()
    option = _OPTION.match(answer) or _LOWER_OPTION.match(answer)
    return option.group(1).upper() if option else None


def grade(answer, gold):
    """True if the extracted answer equals the gold answer.

    Correct when the strings match, mathruler's grade_answer agrees, math-verify's verify
    agrees (gold first, as its signature expects), or the gold is one option letter and
    the answer is that letter, alone or followed by its option text ("B", "(B)",
    "B. 12 cm"), in LaTeX ("\\text{B}") or lower case ("b"; see option_letter). Never a
    substring test: "NONE" contains "E" but is not option E. Two words of letters and digits
    (the colour task's "r2g1b3") match only exactly: the math graders read them as products.
    """
    if answer is None:
        return False
    return _grade_text(answer.strip(), str(gold).strip())


@functools.lru_cache(maxsize=1 << 16)
def _grade_text(answer, gold):
    """grade on two stripped strings, each pair decided once: math-verify runs sympy's simplify
    on a wrong answer like "r2g2b3" (a product of symbols), about 20 ms, and a group's answers
    repeat. On the embedded default that was over half of a training step's time."""
    if answer == gold:
        return True
    if _NUMBER.fullmatch(answer) and _NUMBER.fullmatch(gold):
        return float(answer) == float(gold)         # two plain numbers: no grader needed
    if re.fullmatch(r"\(?[A-Z]\)?", gold):
        return option_letter(answer) == gold.strip("()")
    if _WORD.fullmatch(answer) and _WORD.fullmatch(gold):
        return False                                # two different words of letters and digits
    from mathruler.grader import grade_answer
    if grade_answer(answer, gold):
        return True
    from math_verify import parse, verify
    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${answer}$")))
    except Exception:
        return False


def accuracy_rewards(texts, golds, bare=False):
    """Reward = accuracy of each response's final answer (the paper uses no format term).

    train.py --reward module:function replaces it with any function texts, golds -> floats.
    """
    return [float(grade(extract_answer(t, bare), g)) for t, g in zip(texts, golds)]


def custom_rewards(spec, texts, golds):
    """train.py --reward module:function: import the function and check what it returns.

    Example: "my_rewards:length_penalty" imports my_rewards.py (from the working folder or
    PYTHONPATH) and calls length_penalty(texts, golds) -> [float, ...], one per response.
    """
    import importlib
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"--reward {spec}: cannot load it ({type(e).__name__}: {e}); give "
                         f"module:function with module.py in the working folder or on PYTHONPATH") from None
    values = [float(v) for v in function(texts, golds)]
    if len(values) != len(texts) or not all(math.isfinite(v) for v in values):
        raise SystemExit(f"--reward {spec} returned {len(values)} values for {len(texts)} responses, "
                         f"or a value that is not finite; it must return one finite float per response")
    return values


def informative_groups(rewards, group_ids, low=0.01, high=0.99):
    """DAPO dynamic sampling: keep groups whose mean accuracy is strictly in (low, high).

    A group where every response is right (or every one wrong) has zero advantage and
    only dilutes the batch. Example: rewards [1, 1, 0, 1], groups [0, 0, 1, 1] -> [F, F, T, T].
    """
    _, index = torch.unique(group_ids, return_inverse=True)
    mean = torch.zeros(int(index.max()) + 1).index_add_(0, index, rewards.float())
    mean = mean / torch.bincount(index).float()
    return (mean[index] > low) & (mean[index] < high)


# -----------------------------------------------------------------------------
# ---- scoring ----

def selective_log_softmax(logits, tokens):
    """log softmax(logits)[token] without a second (B, T, V) tensor: logit - logsumexp."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def response_logprobs(lm_head, hidden, tokens, temperature=1.0, chunk=512):
    """log p(token) from the states that predict each token, `chunk` positions at a time.

    hidden (B, T, D), tokens (B, T) -> (B, T) float32. Full-vocabulary logits exist for
    one chunk at a time; with gradients on, each chunk is checkpointed (its logits are
    recomputed in backward), so the peak memory is one (B, chunk, V) float32 block instead
    of (B, T, V): 2.5 GB for 4 x 1024 tokens of Qwen's 152k vocabulary. chunk=0: one block.
    """
    def block(h, tok):
        return selective_log_softmax(lm_head(h).float() / temperature, tok)

    if chunk <= 0:
        return block(hidden, tokens)
    parts = []
    for h, tok in zip(hidden.split(chunk, dim=1), tokens.split(chunk, dim=1)):
        if torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(block, h, tok, use_reentrant=False))
        else:
            parts.append(block(h, tok))
    return torch.cat(parts, dim=1)


def last_states(model, batch, responses, response_mask):
    """The last-layer states of prompt + response, (B, P + T, D): one forward, no KV cache."""
    inputs = dict(batch)
    inputs["input_ids"] = torch.cat([batch["input_ids"], responses], dim=1)
    inputs["attention_mask"] = torch.cat([batch["attention_mask"], response_mask.long()], dim=1)
    if "mm_token_type_ids" in batch:  # needed for the 3-D (M-RoPE) positions of image tokens
        # response tokens are text: type 0
        text_type = torch.zeros_like(responses, dtype=batch["mm_token_type_ids"].dtype)
        inputs["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], text_type], dim=1)
    # use_cache=False reaches the text model: a KV cache over every scored sequence is
    # memory that a single forward never reads
    return model.model(**inputs, use_cache=False).last_hidden_state


@torch.no_grad()
def image_dependence(model, batch, blank_batch, responses, response_mask, chunk=256):
    """How much each response token's prediction depends on the image: the KL between the
    next-token distributions with the image and with a blank one of the same size,
    KL(p(. | image) || p(. | blank)), as PAPO and VPPO measure it. The direct test of
    VGPO's premise: does its focus score (vgpo.visual_focus) rank tokens the same way?

    blank_batch: the same prompts with every image blanked (same size, so the same tokens).
    Full-vocabulary log-probs exist for `chunk` positions at a time. Returns (B, T) float32,
    0 where the image changes nothing. Example: a token the text alone determines -> ~0.
    """
    prompt_len = batch["input_ids"].shape[1]
    # the states at positions P-1 .. P+T-2 predict the T response tokens
    seen = last_states(model, batch, responses, response_mask)[:, prompt_len - 1:-1]        # (B, T, D)
    blind = last_states(model, blank_batch, responses, response_mask)[:, prompt_len - 1:-1]
    parts = []
    for a, b in zip(seen.split(chunk, dim=1), blind.split(chunk, dim=1)):
        log_p = torch.log_softmax(model.lm_head(a).float(), dim=-1)                          # (B, c, V)
        log_q = torch.log_softmax(model.lm_head(b).float(), dim=-1)
        parts.append((log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp(min=0))             # (B, c)
    return torch.cat(parts, dim=1) * response_mask


def rank_correlation(x, y):
    """Spearman's rank correlation of two 1-D tensors (ties get their average rank).
    Example: x [1, 2, 3, 4], y [10, 30, 20, 40] -> 0.8; nan with fewer than 2 values."""
    def ranks(v):
        values, inverse, counts = torch.unique(v.double(), return_inverse=True, return_counts=True)
        start = counts.cumsum(0) - counts                               # first rank of each value
        return (start + (counts - 1) / 2)[inverse]                      # ties share their mean rank
    if x.numel() < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def score(model, batch, responses, response_mask, *, temperature=1.0, focus=False, logp_chunk=512):
    """One forward over prompt + response: log-probs of the response tokens (and focus).

    Only the last-layer states are kept (no output_hidden_states over all layers) and
    lm_head runs on response positions only, never on the prompt, in chunks of
    `logp_chunk` positions (see response_logprobs).
    Returns (logp (B, T) float32, focus (B, T) float32 or None).
    """
    prompt_len = batch["input_ids"].shape[1]
    hidden = last_states(model, batch, responses, response_mask)         # (B, P + T, D)
    # the state at position p predicts token p + 1
    logp = response_logprobs(model.lm_head, hidden[:, prompt_len - 1:-1], responses,
                             temperature, logp_chunk)                    # (B, T)
    if not focus:
        return logp, None
    image_mask = batch["input_ids"] == model.config.image_token_id       # (B, P)
    s = vgpo.visual_focus(hidden[:, prompt_len:].detach(), hidden[:, :prompt_len].detach(), image_mask)
    return logp, s


# -----------------------------------------------------------------------------
# ---- the policy ----: the model behind train.py's and eval.py's two calls

class Policy(torch.nn.Module):
    """The model being trained, with the two things the algorithm asks of it as methods:

        responses, mask, truncated = policy.generate(processor, batch, max_new_tokens=..., ...)
        logp, focus = policy.score(prompts, responses, mask, focus=True)

    generate() and score() call the model's parts in their own ways (model.generate, and
    model.model + lm_head), never its forward. Under --fsdp that matters: FSDP2 gathers
    the root unit's weights (embeddings, lm_head, ...) in the hooks of a forward. So
    parallel.shard registers both methods as forward methods of this module
    (register_fsdp_forward_method), and each call runs those hooks around it. Without
    --fsdp they are plain calls. `policy.model` is the transformers model itself.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def generate(self, processor, batch, **settings):
        """rollout.generate on this policy's model."""
        return generate(self.model, processor, batch, **settings)

    def score(self, prompts, responses, mask, **settings):
        """rollout.score on this policy's model."""
        return score(self.model, prompts, responses, mask, **settings)


# -----------------------------------------------------------------------------
# ---- greedy answers and visual focus: validation (train.py) and benchmarks (eval.py) ----

@torch.no_grad()
def answer_greedily(policy, processor, examples, instruction, *, max_new_tokens, bare, device, focus=False,
                    dependence=False, budget=None):
    """Greedy answers to `examples`, each graded against its "answer": the one scoring
    function of train.py's validation and eval.py's benchmarks.

    policy: a Policy (its two calls run the root's hooks under FSDP).
    Returns one record per example, e.g. {"response": "\\boxed{r2g1b3}", "answer": "r2g1b3",
    "correct": True, "length": 15, "tokens": [the response's token ids]}, plus with focus=True
    "focus": the visual focus of each response token (vgpo.visual_focus, Step 1), a 1-D CPU tensor,
    and with dependence=True "dependence": each token's image_dependence, likewise.
    budget (models.GenerationBudget): split into as many generate() calls as the memory needs.
    """
    batch = encode_prompts(processor, examples, instruction)[0]
    calls = budget.calls(batch["attention_mask"].sum(dim=1), max_new_tokens) if budget else []
    if len(calls) > 1:                       # one call per part, shortest prompts first; same order back
        records = [None] * len(examples)
        for call in calls:
            part = answer_greedily(policy, processor, [examples[k] for k in call.tolist()], instruction,
                                   max_new_tokens=max_new_tokens, bare=bare, device=device, focus=focus,
                                   dependence=dependence)
            for k, record in zip(call.tolist(), part):
                records[k] = record
        return records
    batch = to_device(batch, device)
    with autocast(device):
        # greedy, nothing taken from the checkpoint's generation_config: the paper's protocol
        responses, mask, _ = policy.generate(processor, batch, max_new_tokens=max_new_tokens, temperature=0)
        scores = policy.score(batch, responses, mask, focus=True)[1] if focus else None       # (B, T)
        if dependence:
            # the same prompts with black images of the same sizes: the same tokens, no picture
            blank = [dict(ex, images=[Image.new("RGB", im.size) for im in ex["images"]]) for ex in examples]
            blank_batch = to_device(encode_prompts(processor, blank, instruction)[0], device)
            kl = image_dependence(policy.model, batch, blank_batch, responses, mask)          # (B, T)
    # positions after the first EOS are padding whatever their value (pad may equal EOS)
    texts = processor.batch_decode(torch.where(mask, responses, processor.tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    records = []
    for k, (example, text) in enumerate(zip(examples, texts)):
        answer = extract_answer(text, bare)
        records.append(dict(response=text, answer=answer, correct=bool(grade(answer, example["answer"])),
                            length=int(mask[k].sum()), tokens=responses[k][mask[k]].tolist()))
        if focus:
            records[-1]["focus"] = scores[k][mask[k]].float().cpu()
        if dependence:
            records[-1]["dependence"] = kl[k][mask[k]].float().cpu()
    return records


def focus_profile(focus, mask, parts=3):
    """Mean visual focus of each response over `parts` equal spans of its relative
    position x = t / (T - 1): the one definition of early / middle / late focus (parts=3),
    used by training's log and by eval.py, and of eval.py's focus curve (parts=20).

    (N, T) focus and mask -> (N, parts), nan where a response has no token in a span.
    Example: parts=3, a response of 4 tokens (x = 0, 1/3, 2/3, 1) with focus [4, 3, 2, 1]
    -> [[4, 3, 1.5]]; a 2-token response has an early and a late token, no middle one.
    Every response counts once, whatever its length: a long response does not outweigh
    a short one, so right and wrong answers of different lengths compare fairly.
    """
    mask = mask.bool()
    x = vgpo.relative_position(mask)                                # (N, T) in [0, 1]
    span = (x * parts).long().clamp(max=parts - 1)                  # (N, T): 0 .. parts-1
    onehot = torch.nn.functional.one_hot(span, parts) * mask.unsqueeze(-1)      # (N, T, parts)
    total = (onehot * focus.double().unsqueeze(-1)).sum(dim=1)     # (N, parts)
    count = onehot.sum(dim=1)                                       # (N, parts)
    return (total / count).float()                                  # 0 / 0 = nan: no token there
