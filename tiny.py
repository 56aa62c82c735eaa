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
  train.py starts it from a short supervised warm start (infra.warm_start), the stand-in
  for the -Instruct model the paper starts from.
- CountingTask (--task count): "How many squares?" with 1-4 coloured squares, answered
  with one digit, learned from random weights; fast, so most tests use it.
Both draw squares in a 3x3 grid of 28-pixel cells, one square per vision token. Examples
are a pure function of (seed, index), so a task is generated on the fly, never stored,
and a held-out split is just another seed. The answers need the image: on blank images
the best a model can do is guess (a colour answer 1 in 27; a count 1 in 4).
"""

import os
import random

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
        draw.rectangle((x0, y0, x0 + size, y0 + size), fill=rng.choice(COLOURS))
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


def colour_example(seed, index, blank=False):
    """Example `index` of the colour-counting task of `seed`, with its full target response.

    1-3 red, 1-3 green and 1-3 blue squares (each count uniform and independent, 9 at
    most: one per cell of the 3x3 grid) in random cells, one square per vision token as
    in the counting task. answer: the three steps, red first; solution: the whole
    response, the target of the supervised warm start (infra.warm_start).

    Example: colour_example(0, 3) -> {"problem": "<image>How many red, green, blue squares?",
             "answer": "r3g1b2", "solution": "\\boxed{r3g1b2}", "images": [<84x84 PIL image>],
             "id": "colour-0-3"}
    blank=True draws the same example with an empty image (the gold unchanged): a model
    can only guess, 1 answer in 27 (3.7%), and each count 1 in 3.
    """
    rng = random.Random(seed * 1_000_003 + index + 7)
    image = Image.new("RGB", (GRID * CELL, GRID * CELL), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    counts = [rng.randint(1, 3) for _ in RGB]
    cells = rng.sample(range(GRID * GRID), sum(counts))
    colours = [colour for colour, n in zip(RGB, counts) for _ in range(n)]
    for cell, colour in zip(cells, colours):
        y, x = divmod(cell, GRID)
        size = rng.randint(20, 26)
        x0 = x * CELL + rng.randint(0, CELL - size)
        y0 = y * CELL + rng.randint(0, CELL - size)
        if not blank:                      # the same random draws either way: same gold
            draw.rectangle((x0, y0, x0 + size, y0 + size), fill=colour)
    steps = "".join(f"{name}{n}" for name, n in zip(RGB_NAMES, counts))          # "r3g1b2"
    return {"problem": "<image>How many red, green, blue squares?", "answer": steps,
            "solution": f"\\boxed{{{steps}}}", "images": [image], "id": f"colour-{seed}-{index}"}


class ColourCountingTask(SyntheticTask):
    """--task colour, the default: red, green, blue squares counted step by step (colour_example)."""
    example = staticmethod(colour_example)
