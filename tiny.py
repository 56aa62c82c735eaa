"""
The embedded default: a tiny, randomly initialised Qwen2.5-VL and a synthetic visual task,
so that `python train.py` trains and learns on a laptop CPU with no model hub.

- build_tiny_model(path): the real architecture (Qwen2_5_VLForConditionalGeneration) at a
  toy size, a character-level tokenizer built in code that carries the Qwen chat and
  vision special tokens, and the real Qwen2_5_VLProcessor, all written with
  save_pretrained. Everything downstream (training, resume, eval.py --ckpt) then loads it
  with AutoModelForImageTextToText / AutoProcessor like any hub checkpoint.
- CountingTask: "How many squares?" with 1-4 coloured squares in a 3x3
  grid of 28-pixel cells. Examples are a pure function of (seed, index), so the task is
  generated on the fly, never stored, and a held-out split is just another seed. The
  answer needs the image: on blank images the best a model can do is guess one count,
  25% accuracy.
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


class CountingTask:
    """An indexable dataset of `size` counting examples drawn from `seed`, made on demand."""

    def __init__(self, seed, size, blank=False):
        self.seed, self.size, self.blank = seed, size, blank

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        return counting_example(self.seed, index, self.blank)
