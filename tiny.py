"""
The embedded default: a tiny, randomly initialised Qwen2.5-VL and a synthetic visual task,
so that `python train.py` trains and learns on a laptop CPU with no model hub.

- build_tiny_model(path): the real architecture (Qwen2_5_VLForConditionalGeneration) at a
  toy size, a character-level tokenizer built in code that carries the Qwen chat and
  vision special tokens, and the real Qwen2_5_VLProcessor, all written with
  save_pretrained. Everything downstream (training, resume, eval.py --ckpt) then loads it
  with AutoModelForImageTextToText / AutoProcessor like any hub checkpoint.
- ColourCountingTask (the default, --task colour): "How many red, green, blue squares?"
  answered as a chain of steps, "\\boxed{r2g1b3}": every step reads the image for another
  colour, and all three are graded. 15 tokens, so VGPO's position-dependent
  machinery (the compensation schedule, the tail gate) has a response to work on.
  train.py starts it from a short supervised warm start (warm_start, below), the stand-in
  for the -Instruct model the paper starts from.
- CountingTask (--task count): "How many squares?" with 1-4 coloured squares, answered
  with one digit, learned from random weights; fast, so most tests use it.
Both draw squares in a 3x3 grid of 28-pixel cells, one square per vision token. Examples
are a pure function of (seed, index), so a task is generated on the fly, never stored,
and a held-out split is just another seed. The answers need the image: on blank images
the best a model can do is guess (a colour answer 1 in 27; a count 1 in 4).
"""

import json
import os
import random
import re

import torch
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# tokenizer and processor

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;?!'\"()[]{}<>/\\+-*=^_|\n")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen's chat layout, written for this project: one image item becomes
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one pad per
# merged 28x28 patch.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CELL = 28            # one merged vision token covers 28x28 pixels (patch 14, merge 2)
GRID = 3             # 3x3 cells: an 84x84 image, 9 image tokens


def build_tokenizer():
    """A character-level tokenizer (BPE with no merges) plus the Qwen special tokens.

    Example: "12 <|im_end|>" -> ["1", "2", " ", "<|im_end|>"]; decode joins them back.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>"] + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS,
                                   chat_template=CHAT_TEMPLATE)


def build_tiny_model(path, seed=0, hidden=128, layers=2, vision_hidden=64, vision_depth=2):
    """Write a random-init tiny Qwen2.5-VL + processor to `path` (skipped if already there).

    The same seed always writes the same weights, so every rank and every rerun agrees.
    """
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden // heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=1024,
            # M-RoPE splits each head's rotary half-dimension into (time, height, width)
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
            num_heads=4, out_hidden_size=hidden, window_size=2 * CELL,
            fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    side = GRID * CELL
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": CELL * CELL,
                                                    "longest_edge": side * side}),
        video_processor=Qwen2VLVideoProcessor(), tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, path)                  # atomic: nobody ever loads half a model
    return path


# -----------------------------------------------------------------------------
# the synthetic counting task

COLOURS = [(230, 60, 60), (60, 200, 80), (70, 120, 240), (240, 200, 40), (200, 80, 220), (60, 220, 220)]


def counting_example(seed, index, blank=False):
    """Example `index` of the counting task of `seed`: a dict in the training schema.

    Example: counting_example(0, 5) -> {"problem": "<image>How many squares?",
             "answer": "3", "images": [<84x84 PIL image>], "id": "count-0-5"}
    blank=True draws the same example with an empty image (to show the answer needs it).
    """
    rng = random.Random(seed * 1_000_003 + index)
    count = rng.randint(1, 4)
    image = Image.new("RGB", (GRID * CELL, GRID * CELL), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    for cell in rng.sample(range(GRID * GRID), count):
        if blank:
            break
        y, x = divmod(cell, GRID)
        # a square filling most of its cell: each square lands in one image token, so
        # a 2-layer model can learn to count them in a few minutes of RL on a CPU
        size = rng.randint(20, 26)
        x0 = x * CELL + rng.randint(0, CELL - size)
        y0 = y * CELL + rng.randint(0, CELL - size)
        # PIL's rectangle includes its end point: size pixels wide end at x0 + size - 1, inside the cell
        draw.rectangle((x0, y0, x0 + size - 1, y0 + size - 1), fill=rng.choice(COLOURS))
    return {"problem": "<image>How many squares?", "answer": str(count),
            "images": [image], "id": f"count-{seed}-{index}"}


class SyntheticTask:
    """An indexable dataset of `size` examples of a task drawn from `seed`, made on demand
    by the subclass's `example(seed, index, blank)`."""

    def __init__(self, seed, size, blank=False):
        self.seed, self.size, self.blank = seed, size, blank

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.example(self.seed, index, self.blank)


class CountingTask(SyntheticTask):
    """--task count: "How many squares?" (counting_example)."""
    example = staticmethod(counting_example)


# -----------------------------------------------------------------------------
# the synthetic colour-counting task: a chain of steps, each of which reads the image
#
# The counting task answers in one token. This one answers in a chain of steps: it counts
# the red, then the green, then the blue squares, "\boxed{r2g1b3}", 14 characters (14
# tokens of the character-level tokenizer, 15 with the EOS). The steps ARE the graded
# answer, so each one must read the image, the last as much as the first: a policy that
# stops looking at the image late in its response gets the blue count wrong. Two designs
# that fail this: a total after the steps ("2+1+3=\boxed{6}"), which a model reads off
# the image in one go while its steps are wrong (the steps are decoration); and the
# counts copied into a box after the steps ("r2g1b3=\boxed{213}"), whose late tokens
# copy text and need no image.

RGB = COLOURS[:3]     # red, green, blue: the colours the task counts
RGB_NAMES = "rgb"


def colour_counts(rng, copy_prior=0.0):
    """The three counts of a colour example, each 1-3. copy_prior = P(a count equals the one
    before it): 0 draws them independently; at 0.8 green copies red and blue copies green 4
    times in 5, otherwise it is one of the two other values. Example: copy_prior 1 -> [2, 2, 2]."""
    counts = [rng.randint(1, 3)]
    for _ in RGB[1:]:
        # the text prior of the late steps: "the same as the count before" is usually right
        if copy_prior and rng.random() < copy_prior:
            counts.append(counts[-1])
        elif copy_prior:
            counts.append(rng.choice([n for n in (1, 2, 3) if n != counts[-1]]))
        else:
            counts.append(rng.randint(1, 3))
    return counts


def colour_scene(seed, index, blank=False, copy_prior=0.0):
    """The image of colour example `index` of `seed`, its three counts, and the cells (1-9, row
    by row) that hold each colour's squares: the one drawing of the colour and look tasks.
    Example: colour_scene(0, 3) -> (<84x84 image>, [3, 1, 2], [[1, 2, 8], [4], [3, 6]])."""
    rng = random.Random(seed * 1_000_003 + index + 7)
    image = Image.new("RGB", (GRID * CELL, GRID * CELL), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    counts = colour_counts(rng, copy_prior)
    cells = rng.sample(range(GRID * GRID), sum(counts))
    colours = [colour for colour, n in zip(RGB, counts) for _ in range(n)]
    for cell, colour in zip(cells, colours):
        y, x = divmod(cell, GRID)
        size = rng.randint(20, 26)
        x0 = x * CELL + rng.randint(0, CELL - size)
        y0 = y * CELL + rng.randint(0, CELL - size)
        if not blank:                      # the same random draws either way: same gold
            draw.rectangle((x0, y0, x0 + size - 1, y0 + size - 1), fill=colour)     # inside its cell
    starts = [sum(counts[:k]) for k in range(len(RGB))]
    return image, counts, [sorted(c + 1 for c in cells[a:a + n]) for a, n in zip(starts, counts)]


def colour_example(seed, index, blank=False, copy_prior=0.0):
    """Example `index` of the colour-counting task of `seed`, with its full target response.

    1-3 red, 1-3 green and 1-3 blue squares (each count uniform and independent, 9 at
    most: one per cell of the 3x3 grid) in random cells, one square per vision token as
    in the counting task. answer: the three steps, red first; solution: the whole
    response, the target of the supervised warm start (warm_start, below).

    Example: colour_example(0, 3) -> {"problem": "<image>How many red, green, blue squares?",
             "answer": "r3g1b2", "solution": "\\boxed{r3g1b2}", "images": [<84x84 PIL image>],
             "id": "colour-0-3"}
    blank=True draws the same example with an empty image (the gold unchanged): a model
    can only guess, 1 answer in 27 (3.7%), and each count 1 in 3. copy_prior > 0 draws the
    counts with a late-step prior (colour_counts): the training prompts of --task colour,
    where the text before a step predicts it, as a model's own reasoning does.
    """
    image, counts, _ = colour_scene(seed, index, blank, copy_prior)
    steps = "".join(f"{name}{n}" for name, n in zip(RGB_NAMES, counts))          # "r3g1b2"
    return {"problem": "<image>How many red, green, blue squares?", "answer": steps,
            "solution": f"\\boxed{{{steps}}}", "images": [image], "id": f"colour-{seed}-{index}"}


class ColourCountingTask(SyntheticTask):
    """--task colour, the default: red, green, blue squares counted step by step (colour_example),
    the counts drawn with copy_prior (0 = independent: the held-out prompts)."""

    def __init__(self, seed, size, blank=False, copy_prior=0.0):
        super().__init__(seed, size, blank)
        self.copy_prior = copy_prior

    def example(self, seed, index, blank):
        return colour_example(seed, index, blank, self.copy_prior)


# -----------------------------------------------------------------------------
# ---- the look-or-guess task (--task look) ----: responses of one prompt take different paths
#
# On the colour task every response reads the image the same way, so VGPO's per-response
# weight has nothing to choose between. Here each late step (green, blue) either LOOKS, naming
# the cells of its colour and then the count ("g:47=2": green squares in cells 4 and 7), or
# GUESSES, repeating the count before it ("g=2"): the text prior, right 4 times in 5 on the
# training prompts (copy_prior 0.8), and on a held-out step whose count changes only where the
# step before was itself wrong. The red
# step always looks: nothing comes before it. Graded from the \boxed{} as on the colour task:
#     "r:15=2 g:47=2 b:368=3 \boxed{r2g2b3}"    every step looks (right)
#     "r:15=2 g=2 b=2 \boxed{r2g2b2}"           green and blue guess (blue is wrong)
# A response that looks attends to the image more than one that guesses, which is what VGPO's
# focus is meant to see. "g=" and "g:" differ at their first character, so the choice between
# looking and guessing is one token.

LOOK = re.compile(r"([rgb]):(\d+)=")


def look_example(seed, index, blank=False, copy_prior=0.0, look=1.0, teach_choice=True):
    """Example `index` of the look task of `seed`: colour example `index`'s scene and answer,
    with a target response (solution) whose late steps each look with probability `look` and
    otherwise guess. With teach_choice=False, "free" lists the characters of the solution that
    make the choice (the ":" after a late step's name): the warm start leaves them out of its
    loss, so that an all-looking target teaches how to look without teaching how often.

    Example: look_example(0, 1, look=0.3) -> {"answer": "r1g2b2", "solution":
             "r:3=1 g=1 b=1 \\boxed{r1g1b1}", "free": [], ...}: both late steps guess, and miss
    """
    image, counts, cells = colour_scene(seed, index, blank, copy_prior)
    rng = random.Random(seed * 1_000_003 + index + 11)           # the target's choices, not the scene's
    looks = [True] + [rng.random() < look for _ in RGB[1:]]
    said, notes, free = [], "", []
    for name, count, where, looked in zip(RGB_NAMES, counts, cells, looks):
        said.append(count if looked else said[-1])               # a guess repeats the count before it
        if looked and name != RGB_NAMES[0] and not teach_choice:
            free.append(len(notes) + 1)                          # the ":" of "g:47=2"
        notes += f"{name}:{''.join(map(str, where))}={count} " if looked else f"{name}={said[-1]} "
    box = "".join(f"{name}{n}" for name, n in zip(RGB_NAMES, said))
    return {"problem": "<image>How many red, green, blue squares?",
            "answer": "".join(f"{name}{n}" for name, n in zip(RGB_NAMES, counts)),
            "solution": f"{notes}\\boxed{{{box}}}", "free": free, "images": [image],
            "id": f"look-{seed}-{index}"}


class LookTask(ColourCountingTask):
    """--task look: the colour task's scenes, each late step looking or guessing (look_example).
    `look` is the share of looking late steps in the targets; with `replay`, every even index is
    instead an all-looking target whose choices are left out of the loss (the warm start's mix)."""

    def __init__(self, seed, size, blank=False, copy_prior=0.0, look=1.0, replay=False):
        super().__init__(seed, size, blank, copy_prior)
        self.look, self.replay = look, replay

    def example(self, seed, index, blank):
        if self.replay and index % 2 == 0:
            return look_example(seed, index, blank, self.copy_prior, look=1.0, teach_choice=False)
        return look_example(seed, index, blank, self.copy_prior, self.look)


def chain_looks(text):
    """The steps a response looked at: those written with their cells before its last \\boxed{}.
    Example: "r:15=2 g=2 b:368=3 \\boxed{r2g2b3}" -> {"r", "b"} (green guessed)."""
    end = text.rfind("\\boxed{")
    return {match.group(1) for match in LOOK.finditer(text[:end if end >= 0 else len(text)])}


# -----------------------------------------------------------------------------
# ---- the chain's steps ----: which step of a response is right, and where it sits
#
# The colour task's answer is a chain of steps, "r2g1b3". These read a response step by step,
# so that validation and eval.py can say WHERE in the chain a policy goes wrong: visual
# forgetting is a late step that follows the text before it (a copy of the previous count)
# instead of the image. Hub data marks no steps; there the thirds of rollout.focus_profile apply.

STEP = re.compile(r"([rgb])(\d)")


def chain_steps(text):
    """{step name: (count, character position of its digit)} of the last \\boxed{} of a
    response (else of the whole text). A step that is missing is absent; a step written twice
    keeps its first. Example: "\\boxed{r2b3}" -> {"r": (2, 8), "b": (3, 10)}: green skipped."""
    start = text.rfind("\\boxed{")
    offset = start + len("\\boxed{") if start >= 0 else 0
    steps = {}
    for match in STEP.finditer(text, offset):
        steps.setdefault(match.group(1), (int(match.group(2)), match.start(2)))
    return steps


def chain_sums(records, golds, tokenizer):
    """Per-step sums over greedy answers (rollout.answer_greedily records), for validation's
    log and eval.py, to be divided after an all-reduce:
        step_correct_k   answers whose step k is right, k = 0 (red), 1 (green), 2 (blue)
        step_focus_k / step_focused_k   the summed focus at step k's digit token / answers with one
        late_errors / late_copies       late steps (1, 2) that are wrong / of those, the ones
                         that repeat the answer's own previous count (the text, not the image)
        late_steps / looks / looks_right   late steps / of those, the ones that look at their
                         cells (the look task, chain_looks) / of those, the right ones
        breaks / break_guesses / break_guesses_right   late steps whose truth differs from the
                         count before it (the prior misleads) / of those, guessed / guessed right
    Example: gold "r1g2b2", answer "\\boxed{r1g1b1}": steps 0 right, 1 and 2 wrong; both late
    errors copy the count before them -> late_errors 2, late_copies 2.
    """
    sums = {}
    for k in range(len(RGB)):
        sums.update({f"step_correct_{k}": 0.0, f"step_focus_{k}": 0.0, f"step_focused_{k}": 0.0})
    sums.update(late_errors=0.0, late_copies=0.0, late_steps=0.0, looks=0.0, looks_right=0.0,
                breaks=0.0, break_guesses=0.0, break_guesses_right=0.0)
    for record, gold in zip(records, golds):
        truth = [count for count, _ in chain_steps(gold).values()]
        steps, looked = chain_steps(record["response"]), chain_looks(record["response"])
        said = [steps.get(name, (None, None))[0] for name in RGB_NAMES]
        # which response token holds each character: the decoded length of every token so far
        ends = None
        if "focus" in record:
            pieces = tokenizer.batch_decode([[t] for t in record["tokens"]], skip_special_tokens=True)
            ends = torch.tensor([len(p) for p in pieces]).cumsum(0)
        for k, name in enumerate(RGB_NAMES):
            sums[f"step_correct_{k}"] += float(said[k] == truth[k])
            if ends is not None and name in steps:
                token = int(torch.searchsorted(ends, steps[name][1], right=True))
                if token < len(record["focus"]):
                    sums[f"step_focus_{k}"] += float(record["focus"][token])
                    sums[f"step_focused_{k}"] += 1
            if k == 0:
                continue
            right, breaks, looks = said[k] == truth[k], truth[k] != truth[k - 1], name in looked
            for key, counted in (("late_steps", True), ("looks", looks), ("looks_right", looks and right),
                                 ("breaks", breaks), ("break_guesses", breaks and not looks),
                                 ("break_guesses_right", breaks and not looks and right)):
                sums[key] += float(counted)
            if not right:
                sums["late_errors"] += 1
                sums["late_copies"] += float(said[k] is not None and said[k] == said[k - 1])
    return sums


def prior_probability(text, copy_prior):
    """The probability that a prompt drawn with copy_prior (colour_counts) has the answer the
    response gives: 1/3 for the first count, then copy_prior for a repeated count and
    (1 - copy_prior) / 2 for each other one. Example: "\\boxed{r1g1b1}" at 0.8 -> 1/3 x 0.8 x 0.8
    = 0.213; "\\boxed{r1g2b3}" -> 1/3 x 0.1 x 0.1 = 0.003; no full chain -> 0."""
    steps = chain_steps(text)
    counts = [steps[name][0] for name in RGB_NAMES if name in steps]
    if len(counts) != len(RGB) or not all(1 <= c <= 3 for c in counts):
        return 0.0
    if not copy_prior:                          # drawn independently: 1 in 27 for every chain
        return (1 / 3) ** len(RGB)
    p = 1 / 3
    for before, now in zip(counts, counts[1:]):
        p *= copy_prior if now == before else (1 - copy_prior) / 2
    return p


def chain_metrics(sums, n, prefix="val_", looks=False):
    """The named means of chain_sums' (all-reduced) sums over n answers: step accuracy and
    step focus as lists in chain order (red, green, blue), and the late errors' copy share;
    with `looks` (the look task) also the share of late steps that look (look_rate), the
    accuracy of those that look (look_acc), and of those that guess where the prior misleads
    (guess_acc_breaking). A share of nothing is nan."""
    steps = range(len(RGB))
    out = {f"{prefix}step_acc": [sums[f"step_correct_{k}"] / max(n, 1) for k in steps],
           f"{prefix}step_focus": [sums[f"step_focus_{k}"] / sums[f"step_focused_{k}"]
                                   if sums[f"step_focused_{k}"] else float("nan") for k in steps]}
    share = lambda part, whole: sums[part] / sums[whole] if sums[whole] else float("nan")
    out[f"{prefix}late_copy_share"] = share("late_copies", "late_errors")
    if looks:
        out.update({f"{prefix}look_rate": share("looks", "late_steps"),
                    f"{prefix}look_acc": share("looks_right", "looks"),
                    f"{prefix}guess_acc_breaking": share("break_guesses_right", "break_guesses")})
    return out


# -----------------------------------------------------------------------------
# ---- the embedded default's starting policy ----: a supervised warm start

def warm_start_sets(seed, copy_prior, size, n_checks=64, task="colour"):
    """The warm start's training examples and its held-out checks. It trains on the prior's
    prompts, as RL does; it stops on prompts drawn without the prior, because a stop on the
    prior's own prompts is met by learning the prior instead of reading the image. The look
    task trains without the prior (its guesses copy whatever the counts), on LookTask's mix:
    half all-looking targets that teach looking, half that look at a late step LOOK_SHARE of
    the time, and so teach how often to."""
    if task == "look":
        return (LookTask(seed + 20_000, size, look=LOOK_SHARE, replay=True),
                [look_example(seed + 30_000, i) for i in range(n_checks)])
    return (ColourCountingTask(seed + 20_000, size, copy_prior=copy_prior),
            [colour_example(seed + 30_000, i) for i in range(n_checks)])


def warm_start_done(first_step_accuracy, target):
    """The warm start's stopping rule: stop once the FIRST step (red) is right on `target` of
    the held-out prompts. No text predicts the first count, so this measures reading the
    image, and the prior cannot meet it. The late steps, which the prior lets the model
    answer from its own earlier text, lag behind at that point: seeds 0-3 stopped at about
    0.8 / 0.7 / 0.55 along the chain (BENCHMARKS.md). A stop on the whole answer's accuracy
    fell anywhere from before red was read to after every step was. Example: 0.82 -> True."""
    return first_step_accuracy >= target


# the look task's warm start: the share of looking late steps in its targets, and its stop:
# sampled late steps that look are right LOOK_TARGET of the time (checked every LOOK_EVERY
# steps). Without the all-looking half of the mix, looking is learned from 3 targets in 10
# and stays far less accurate (BENCHMARKS.md, the look task).
LOOK_SHARE, LOOK_TARGET, LOOK_EVERY = 0.3, 0.85, 40


def look_warm_start_done(checked):
    """The look task's stopping rule, on look_checks' sampled figures: looking is mostly right,
    so that RL starts from a policy whose looks pay and whose guesses are a prior. The share
    of steps that look is set by the targets (LOOK_SHARE), not by the stop.
    Example: {"sampled_look_acc": 0.87, ...} -> True."""
    return checked["sampled_look_acc"] >= LOOK_TARGET          # nan (nothing looked) never stops


def look_checks(model, processor, checks, args, samples=4):
    """The look task's policy on held-out `checks`, sampled `samples` times each at
    --temperature as RL samples: chain_metrics' figures (look rate, look accuracy, guess
    accuracy where the prior misleads, step accuracy), prefixed "sampled_", and the accuracy.
    Before RL, looking should be mostly right (>= 0.8), guessing mostly wrong where the prior
    misleads (<= 0.3), and 10-40% of the late steps should look. Step accuracy is read from
    the box (chain_steps); a late step written without its cells counts as a guess."""
    import rollout

    model.eval()
    prompts, _ = rollout.encode_prompts(processor, checks * samples, args.instruction)
    with torch.no_grad():
        responses, mask, _ = rollout.generate(model, processor, prompts, max_new_tokens=args.max_new_tokens,
                                              temperature=args.temperature, top_p=args.top_p)
    texts = processor.batch_decode(torch.where(mask, responses, processor.tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    golds = [c["answer"] for c in checks] * samples
    out = chain_metrics(chain_sums([dict(response=t) for t in texts], golds, None), len(texts), "sampled_",
                        looks=True)
    out.pop("sampled_step_focus")                                  # no focus is scored here
    out["sampled_acc"] = sum(rollout.grade(rollout.extract_answer(t, False), g) for t, g in zip(texts, golds))
    out["sampled_acc"] /= len(texts)
    return out


def supervised_loss(model, processor, examples, instruction):
    """The warm start's loss: teacher-forced cross-entropy of each example's solution and the
    EOS, right-padded as rollout.generate returns responses, scored by rollout.score (the
    forward RL scores with). The characters an example lists as "free" (look_example) are
    left out. The tokenizer is one token per character, so a character's index is its token's."""
    import rollout

    tokenizer = processor.tokenizer
    targets = [tokenizer(ex["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for ex in examples]
    width = max(map(len, targets))
    responses = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in targets])  # (B, W)
    mask = torch.arange(width) < torch.tensor([len(t) for t in targets]).unsqueeze(1)           # (B, W)
    prompts, _ = rollout.encode_prompts(processor, examples, instruction)
    logp, _ = rollout.score(model, prompts, responses, mask)                                    # (B, W)
    taught = mask.clone()                    # a free character is still read, but not a target
    for i, ex in enumerate(examples):
        if ex.get("free"):
            assert len(targets[i]) == len(ex["solution"]) + 1, "free characters need one token each"
            taught[i, ex["free"]] = False
    return -(logp * taught).sum() / taught.sum()       # mean cross-entropy over the taught tokens


def warm_start_check(model, processor, checks, args, target):
    """(held-out accuracy, per-step accuracy, look figures, stop?) of the warm start so far:
    greedy on the colour task (warm_start_done), sampled on the look task (look_warm_start_done)."""
    import rollout

    model.eval()
    if args.task == "look":
        checked = look_checks(model, processor, checks, args)
        return checked["sampled_acc"], checked["sampled_step_acc"], checked, look_warm_start_done(checked)
    records = rollout.answer_greedily(rollout.Policy(model), processor, checks, args.instruction,
                                      max_new_tokens=args.val_max_new_tokens, bare=False,
                                      device=torch.device("cpu"))
    step_acc = chain_metrics(chain_sums(records, [c["answer"] for c in checks], processor.tokenizer),
                             len(checks), prefix="")["step_acc"]
    accuracy = sum(r["correct"] for r in records) / len(records)
    return accuracy, step_acc, {}, warm_start_done(step_acc[0], target)


def warm_start(model_path, out_path, args, master, batch=64, lr=1e-3, check_every=2, max_steps=300,
               target=0.8, n_checks=128, stop=None):
    """Write `model_path` after a short supervised warm start on the colour or look task to `out_path`.

    The stand-in for "-Instruct": the paper starts RL from Qwen2.5-VL-7B-Instruct, a policy
    that already answers in the expected format. Here the tiny random model is trained with
    teacher-forced cross-entropy on the task's full solutions ("\\boxed{r2g1b3}" + EOS,
    supervised_loss) until it follows the format and reads the first step off the image:
    greedy accuracy at the first step of `n_checks` held-out examples reaches `target`
    (warm_start_done, checked every `check_every` steps). Then it stops, clearly imperfect on
    the answer, so that RL has most of the way still to go. It trains with --copy_prior and
    checks without it (warm_start_sets): at the stop it leans on the prior's shortcut, so its
    late steps follow the earlier ones where held-out prompts need the image. The look task
    trains on its mix of targets (warm_start_sets) for up to twice `max_steps`, checked every
    LOOK_EVERY steps by sampling (look_warm_start_done).

    Deterministic from --seed: it trains on task seed + 20_000 (neither the RL training
    set, seed + 0, nor validation, seed + 10_000) and checks on seed + 30_000, in order,
    after torch.manual_seed(seed). Prompts are built as training builds them
    (rollout.encode_prompts with --instruction). Written to a temporary folder, then renamed
    (atomic); skipped when out_path already holds a model. Returns (out_path, steps,
    accuracy), or (None, steps, accuracy) when `stop` (checkpoints.StopSignal) received a
    signal first: then nothing is written.
    """
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if os.path.exists(os.path.join(out_path, "model.safetensors")):
        with open(os.path.join(out_path, "warm_start.json")) as f:
            info = json.load(f)
        if info.get("task", "colour") != args.task:           # another task's policy: never reused
            raise SystemExit(f"{out_path} holds the warm start of --task {info.get('task', 'colour')}, not "
                             f"--task {args.task}: give this run its own --out_dir")
        return out_path, info["steps"], info["accuracy"]
    torch.manual_seed(args.seed)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_path)
    if args.task == "look":
        max_steps, check_every = 2 * max_steps, LOOK_EVERY
    train, checks = warm_start_sets(args.seed, args.copy_prior, batch * max_steps, n_checks, args.task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    accuracy, step_acc, checked = 0.0, [0.0] * len(RGB), {}
    bar = tqdm(total=max_steps, desc="warm start", unit="step", disable=not master, dynamic_ncols=True)
    for step in range(1, max_steps + 1):
        if stop is not None and stop.received:
            bar.close()
            return None, step - 1, accuracy              # a cut warm start is not kept
        model.train()
        loss = supervised_loss(model, processor, [train[i] for i in range((step - 1) * batch, step * batch)],
                               args.instruction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.update(1)
        if step % check_every == 0:
            accuracy, step_acc, checked, done = warm_start_check(model, processor, checks, args, target)
            looks = {"looks": f"{checked['sampled_look_rate']:.2f}",
                     "right": f"{checked['sampled_look_acc']:.2f}"} if checked else {}
            bar.set_postfix(loss=f"{loss.item():.3f}", held_out_acc=f"{accuracy:.2f}",
                            steps="/".join(f"{a:.2f}" for a in step_acc), **looks)
            if done:
                break
    bar.close()
    tmp = f"{out_path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "warm_start.json"), "w") as f:
        json.dump(dict(steps=step, accuracy=accuracy, step_accuracy=step_acc, target=target,
                       copy_prior=args.copy_prior, batch=batch, lr=lr, task=args.task, checks=checked), f)
    os.replace(tmp, out_path)                  # atomic: nobody ever loads half a model
    return out_path, step, accuracy


def starting_model(args, ranks, stop=None):
    """--model tiny: the folder of the model RL starts from, built on rank 0 once per out_dir.

    The colour and look tasks on synthetic data start from the supervised warm start (warm_start),
    as the paper starts from an -Instruct model; the count task starts from random weights.
    Returns <out_dir>/tiny-init, or <out_dir>/tiny-init-warm. The other ranks wait for it.
    """
    path = os.path.join(args.out_dir, "tiny-init")
    warm = args.task in ("colour", "look") and args.train_data == "synthetic"
    if ranks.master:
        build_tiny_model(path, seed=args.seed)
        if warm:
            done, steps, accuracy = warm_start(path, path + "-warm", args, ranks.master, stop=stop)
            if done:
                how = "sampled" if args.task == "look" else "greedy"
                print(f"warm start: {steps} supervised steps, held-out {how} accuracy {accuracy:.2f}")
    if ranks.world > 1:
        import torch.distributed as dist
        dist.barrier()                          # the folder is written before any rank reads it
    return path + "-warm" if warm else path
