"""
Decoding: HF generate, made to pay less for what a rollout repeats. Skip it on a first
read: rollout.generate calls it. Greedy tokens are one plain generate() call's; sampled ones
come from the same distribution (in one segment, from the same random draws).

    ---- one prefill a group ----   the G samples of a group share their prompt, so its
                                    prefill (and its images' pass through the vision tower)
                                    runs once, and its KV cache is repeated G times
    ---- segments ----              a plain call decodes every row until its longest one is
                                    done; in segments of --decode_segment new tokens, the
                                    rows that finished are dropped from the batch and from
                                    the KV cache between segments

Both continue generation from a given KV cache, which transformers 5 supports for
Qwen2.5-VL, M-RoPE offsets included (tested against plain calls); other models, and a
static cache, take the plain path.
"""

import torch

# new tokens a segment decodes before its finished rows are dropped: 8 segments for the
# paper's 2048-token responses; a segment's start costs about one decoding step
SEGMENT = 256

# the per-row inputs of a prompt batch that grow with the sequence (the others are pixels)
PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")


def shares_prefill(config, cache="dynamic"):
    """Whether generation can continue from a cache it is given: a Qwen2.5-VL decoding with a
    dynamic cache. Then a prompt is prefilled once for its samples, and decoding goes in segments."""
    return cache == "dynamic" and config.model_type == "qwen2_5_vl"


def generate(model, batch, max_new_tokens, settings, cache="dynamic", repeats=None, segment=SEGMENT):
    """The response tokens (B, T) of model.generate(**batch, **settings): one plain call where
    generation cannot continue from a given cache (shares_prefill); else each prompt
    prefilled once for its `repeats` samples (prefill_once), decoded in segments (in_segments)."""
    if not shares_prefill(model.config, cache):
        if repeats is not None:
            raise ValueError("repeats needs a model and cache that decode.shares_prefill")
        static = {"cache_implementation": "static"} if cache == "static" else {}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, **settings, **static)
        return out[:, batch["input_ids"].shape[1]:]
    kv = None
    if repeats is not None:
        batch, kv = prefill_once(model, batch, torch.as_tensor(repeats).to(batch["input_ids"].device))
    return in_segments(model, batch, kv, max_new_tokens, segment or max_new_tokens, settings)


# -----------------------------------------------------------------------------
# ---- one prefill a group ----

def distinct_prompts(rows, shared):
    """The prompts of a generate() call's rows, each once, and its count of samples, when
    `shared` (shares_prefill); else every row and None. A call's rows come prompt by prompt
    (in order, or sorted stably by prompt length: models.GenerationBudget.calls).
    Example: rows [4, 4, 4, 9, 9] -> ([4, 9], [3, 2])."""
    if not shared:
        return rows, None
    return torch.unique_consecutive(rows, return_counts=True)


def prefill_once(model, batch, repeats):
    """The KV cache of each prompt of `batch` but its last token, computed once and then
    repeated `repeats` times row by row, and the prompt rows repeated to match.

    One forward of the distinct prompts gives what G forwards of the repeated rows would.
    generate() then feeds only the last prompt token and samples from there, as it
    continues any given cache. Returns (repeated batch without pixels, cache)."""
    from transformers import DynamicCache
    head = {k: v[:, :-1] if k in PER_TOKEN else v for k, v in batch.items()}
    kv = DynamicCache(config=model.config)
    model.model.rope_deltas = None                   # the forward computes the prompts' M-RoPE offsets
    if "image_grid_thw" not in batch:
        # text-only prompts: without images the forward would number the left padding too;
        # generate numbers the attended tokens only, from 0, and so must the prefill
        mask = head["attention_mask"]
        head["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        model.model.rope_deltas = torch.zeros(len(mask), 1, dtype=torch.long, device=mask.device)
    model(**head, past_key_values=kv, use_cache=True, logits_to_keep=1)
    kv.batch_repeat_interleave(repeats)
    # each prompt's offset, once per row of the repeated batch, which generate's positions add
    model.model.rope_deltas = model.model.rope_deltas.repeat_interleave(repeats, dim=0)
    return {k: batch[k].repeat_interleave(repeats, dim=0) for k in PER_TOKEN if k in batch}, kv


# -----------------------------------------------------------------------------
# ---- segments ----

def in_segments(model, batch, kv, max_new_tokens, segment, settings):
    """Responses (B, T) of model.generate(**batch, **settings), T at most max_new_tokens,
    decoded `segment` new tokens at a time; after each segment the rows that wrote an EOS
    leave the batch and the KV cache `kv` (None: generate builds it from the prompts).

    Greedy decoding gives the same tokens as one call (tested); sampling, the same
    distribution, from fewer random draws. Example: 3 rows that end after 5, 300 and
    2048 tokens, segment 256: 3 x 256 + 2 x 256 + 6 x 256 = 2,816 row-steps, not 3 x 2048."""
    rows = len(batch["input_ids"])
    out = torch.full((rows, max_new_tokens), settings["pad_token_id"], dtype=torch.long,
                     device=batch["input_ids"].device)
    alive = torch.arange(rows, device=out.device)                 # the rows still decoding
    eos = torch.tensor(settings["eos_token_id"], device=out.device)
    done = 0                                                      # new tokens written so far
    while done < max_new_tokens:
        n = min(segment, max_new_tokens - done)
        res = model.generate(**batch, past_key_values=kv, max_new_tokens=n, return_dict_in_generate=True,
                             **settings)
        new = res.sequences[:, batch["input_ids"].shape[1]:]                      # (alive, <= n)
        out[alive, done:done + new.shape[1]] = new
        done += new.shape[1]
        going = ~torch.isin(new, eos).any(dim=1)                                  # (alive,)
        if new.shape[1] < n or not going.any():                   # generate stopped: every row is done
            break
        # the rows still going, with what they wrote appended (attended, text tokens); the
        # cache holds every token but the last one written, which the next segment feeds
        keep = going.nonzero()[:, 0]
        kv = res.past_key_values
        kv.batch_select_indices(keep)
        model.model.rope_deltas = model.model.rope_deltas[keep]
        grown = {"input_ids": res.sequences, "attention_mask": torch.ones_like(new),
                 "mm_token_type_ids": torch.zeros_like(new)}
        batch = {k: (grown[k] if k == "input_ids" else torch.cat([batch[k], grown[k]], dim=1))[keep]
                 for k in PER_TOKEN if k in batch}
        alive = alive[keep]
    return out[:, :done]


def row_steps(lengths, segment):
    """The decode row-steps a call pays for responses of these lengths (EOS included): one
    call decodes every row until the longest ends (segment 0); in segments, a row that
    ended leaves at the end of its segment.
    Example: lengths [5, 300, 2048], segment 256 -> 2,816 (in_segments); segment 0 -> 6,144."""
    lengths = torch.as_tensor(lengths)
    longest = int(lengths.max()) if len(lengths) else 0
    if not segment:
        return len(lengths) * longest
    total = 0
    for start in range(0, longest, segment):
        # the rows that had not ended when this segment began, each for the segment's width
        total += int((lengths > start).sum()) * min(segment, longest - start)
    return total
