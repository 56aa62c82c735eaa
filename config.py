"""
train.py's flags and presets: every setting of a run, with the paper's symbol and value.

    config.parse_args(["--preset", "paper7b"])   # the paper's 7B recipe; explicit flags still win

The defaults are the embedded tiny preset (a CPU run of a few minutes); PRESETS holds the
paper's recipe as a plain dict of flag values. RUN_IDENTITY names the settings a resumed
run must share with its checkpoint (check_same_run).
"""

import argparse
import math
import os

import rollout
import vgpo


# Raw: the scripts' docstrings, whose launch commands and numbered lists are the --help text,
# keep their line breaks. Defaults: a flag's help never has to repeat its default (and cannot
# go stale); with a --preset, what is shown is the built-in default, not the preset's value.
# train.py and eval.py both use it.
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's actual default."""

# -----------------------------------------------------------------------------
# configuration: defaults are the embedded tiny preset; --preset paper7b is the paper's

PRESETS = {
    # The paper's 7B recipe (VGPO.md, "The paper's 7B recipe"), one node of 8 x 80 GB.
    "paper7b": dict(
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        # data as it is on the hub: PAPO_MMK12_test's only split is "train"
        train_data="PAPOGalaxy/PAPO_ViRL39K_train", train_split="train",
        val_data="PAPOGalaxy/PAPO_MMK12_test", val_split="train",
        # the instruction PAPO_eval's questions end with: trained and scored the same way
        instruction=rollout.INSTRUCTION, bare_answers=False,
        # rollout: 512 prompts x G = 8 at temperature 1.0, top-p 0.99, DAPO resampling;
        # prompts over 4096 tokens are dropped, never cut (a cut through the image tokens
        # fails the forward); images between 512 x 512 and 2048 x 2048 pixels' worth
        rollout_batch=512, group_size=8, temperature=1.0, top_p=0.99, max_tries=4,
        max_prompt_len=4096, max_new_tokens=2048, min_pixels=262144, max_pixels=4194304,
        # update: mini-batch 128 prompts, 2 epochs, AdamW 1e-6, no KL, grad clip 1.0.
        # 512 / 128 = 4 optimizer steps per rollout, each rollout used once (ppo_epochs 1);
        # max_steps -1: the run lasts 2 passes over ViRL39K's prompts (epochs), not N steps
        mini_batch=128, ppo_epochs=1, epochs=2, max_steps=-1,
        lr=1e-6, weight_decay=1e-2, grad_clip=1.0, kl_coef=0.0,
        # VGPO: β, κ, γ as published; every switch on (the defaults)
        beta=0.3, kappa=0.2, gamma=0.5,
        # memory: 4 sequences a forward fit 80 GB at the longest prompt and response; the
        # rows of each generate() call come from the memory plan at the prompts' actual
        # lengths (printed at start-up; models.GenerationBudget), at most a rank's whole
        # round, 64 prompts x 8, and 256 prompts a validation call
        micro_batch=4, gen_batch=512, val_batch=256,
        gradient_checkpointing=True, freeze_vision=False, fsdp=True,
        # the whole validation set (val_size -1); val_focus off: it costs one more forward
        # over every validation answer of up to 2048 tokens
        val_every=5, save_every=10, val_size=-1, val_max_new_tokens=2048, val_focus=False,
        # a 7B checkpoint is about 100 GB with its AdamW state: the last 2 (the newest is the
        # final one at the end), not 0.5 TB over a run
        keep_last=2,
    ),
}


# The embedded tasks (tiny.py) and the flags each one sets; the defaults below are the
# colour task's. A --preset, then the command line, win over these.
TASKS = {
    # "\boxed{r2g1b3}": 15 tokens, a chain of counts each read from the image, graded only
    # from the \boxed{}, trained from the supervised warm start (tiny.warm_start).
    # 16 new tokens: the answer and its end token, plus one. Only the last \boxed{} is
    # graded, so without a bound the tiny policy learns to trail "}}}}" after it. A cosine
    # decay of the learning rate over 150 steps: at a constant 3e-4 a run fell from 0.99 to
    # 0.61 in its last 10 steps; a cosine over 80 steps stopped one at 0.76, and over 100
    # steps runs ended between 0.735 and 0.895 (seeds 0-2); at lr 5e-4 the answers grew past
    # the 16 tokens and validation stalled at 0.71-0.755.
    "colour": dict(max_new_tokens=16, val_max_new_tokens=16, temperature=1.0, lr=3e-4,
                   max_steps=150, lr_schedule="cosine", val_every=10, bare_answers=False, copy_prior=0.8),
    # the colour task's scenes, each late step looking at its cells ("g:47=2") or guessing
    # from the count before it ("g=2"): the control experiment of bench.py --forgetting N
    # --forgetting_task look, in which a group's responses take different paths (tiny.look_example). 42 new
    # tokens: three looks at 3 cells each (24), the box (14), the EOS, and 3.
    "look": dict(max_new_tokens=42, val_max_new_tokens=42, temperature=1.0, lr=3e-4,
                 max_steps=100, lr_schedule="cosine", val_every=10, bare_answers=False, copy_prior=0.8),
    # the one-token counting task from random weights: the bare digit is the answer, since
    # a random model cannot write \boxed{}
    # (2 new tokens: the one-digit count, 1 to 4, and the end token)
    "count": dict(max_new_tokens=2, val_max_new_tokens=2, temperature=1.0, lr=5e-4,
                  max_steps=120, val_every=20, bare_answers=True),
}


def build_parser(description=""):
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    # ---- flags, under banners; --help shows each one's default ----
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="a named recipe; flags given on the command line still win")
    g.add_argument("--out_dir", default="out", help="metrics.jsonl, config.json and checkpoints/ go here")
    # fresh when there is no run yet: one command both starts a job and continues it after a
    # preemption
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in <out_dir>/checkpoints (fresh if "
                        "there is no run)")
    g.add_argument("--max_steps", type=int, default=150,
                   help="training steps; -1 = until --epochs passes of prompts have been drawn")
    # counted in prompts drawn, not in steps: DAPO's resampling draws more than --rollout_batch
    # prompts in some steps, so a step is not a fixed share of an epoch
    g.add_argument("--epochs", type=float, default=1.0,
                   help="with --max_steps -1: passes over the training prompts, counted in prompts drawn "
                        "(paper: 2)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the tiny model, the data order and the sampling")
    # "always at the end": the last step's checkpoint is the one eval.py scores by default
    g.add_argument("--save_every", type=int, default=40,
                   help="checkpoint every N steps (and always at the end); 0 = only at the end")
    g.add_argument("--val_every", type=int, default=10,
                   help="validate every N steps (and always at the end); 0 = only at the end")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help="hub id or folder of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint; 'tiny' = the "
                        "embedded model")
    # off for the tiny model, on in paper7b: it buys memory with time (the forward runs again in
    # backward), which only a 7B model needs
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in backward to save memory (paper: on)")
    g.add_argument("--freeze_vision", action=argparse.BooleanOptionalAction, default=False,
                   help="do not train the vision tower (paper: trained)")
    # on in paper7b; without it every rank keeps the whole model and AdamW state (data parallel)
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False,
                   help="under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2; see "
                        "README)")

    g = p.add_argument_group("data")
    g.add_argument("--task", default="colour", choices=sorted(TASKS),
                   help="the synthetic task: colour = count red, green, blue squares step by step (tiny.py), "
                        "look = the same, each late step looking at its cells or guessing from the count "
                        "before (a control experiment: bench.py --forgetting N --forgetting_task look), "
                        "count = how many squares, one token")
    g.add_argument("--copy_prior", type=float, default=0.0,
                   help="colour and look tasks: P(a count equals the one before it) in the TRAINING "
                        "prompts, a text prior that late steps can follow instead of the image (0 = "
                        "independent; held-out prompts are always independent; their default 0.8)")
    g.add_argument("--train_data", default="synthetic",
                   help="hub dataset id, local .parquet/.json/.jsonl file or folder, or 'synthetic'")
    g.add_argument("--train_split", default="train", help="split of --train_data (hub ids and folders)")
    g.add_argument("--val_data", default="synthetic",
                   help="as --train_data; 'synthetic' = a held-out set of --task")
    # paper7b sets "train": PAPO_MMK12_test's only split is called train
    g.add_argument("--val_split", default="test", help="split of --val_data")
    g.add_argument("--val_size", type=int, default=200, help="validation examples (-1 = the whole set)")
    g.add_argument("--val_batch", type=int, default=100,
                   help="at most this many prompts per greedy generate() call in validation (on a GPU, "
                        "fewer when the memory plan says so)")
    g.add_argument("--val_max_new_tokens", type=int, default=16,
                   help="longest validation response (paper: 2048)")
    g.add_argument("--val_focus", action=argparse.BooleanOptionalAction, default=True,
                   help="also log the late/early visual focus of validation answers (one more forward)")
    g.add_argument("--skip_bad_rows", action="store_true",
                   help="skip (and count) rows with a missing image or answer instead of stopping")
    # never truncated: a prompt cut through its image tokens makes the forward fail ("Image
    # features and image tokens do not match")
    g.add_argument("--max_prompt_len", type=int, default=512,
                   help="prompts longer than this (tokens, images included) are dropped and counted, never "
                        "truncated")
    g.add_argument("--min_pixels", type=int, default=0,
                   help="resize images to at least this many pixels (0 = processor default; paper 262144)")
    g.add_argument("--max_pixels", type=int, default=0,
                   help="resize images to at most this many pixels (0 = processor default; paper 4194304)")
    g.add_argument("--instruction", default="",
                   help="appended to every problem (paper preset: reason in <think></think>, answer in "
                        "\\boxed{})")
    # accuracy only, as the paper: no format reward, no length penalty
    g.add_argument("--reward", default="accuracy",
                   help="accuracy (the paper's: the last \\boxed{} graded), or module:function(texts, golds) "
                        "-> floats")
    g.add_argument("--bare_answers", action=argparse.BooleanOptionalAction, default=False,
                   help="take the last number when there is no \\boxed{} (count task: a random model "
                        "cannot box)")

    # the paper's symbol and value are in each help text; defaults are the tiny preset's
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout_batch", type=int, default=32,
                   help="prompts per step, all ranks together (paper: 512)")
    # G >= 2 is enforced in parse_args: a group of one has no other response to be compared with
    g.add_argument("--group_size", type=int, default=8, help="G, responses sampled per prompt (paper: 8)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (paper: 0.99)")
    g.add_argument("--max_new_tokens", type=int, default=16, help="longest response (paper: 2048)")
    # decoding reads every weight once per token, so its speed is the bytes read: bf16 halves them
    g.add_argument("--sample_dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights generate() samples with: auto = bfloat16 on a GPU (a bf16 copy of the "
                        "policy, refreshed before each rollout: decoding reads half the bytes) and float32 "
                        "on a CPU (the policy itself). Under --fsdp, FSDP's mixed precision decides (bf16 "
                        "on a GPU)")
    g.add_argument("--decode_cache", default="dynamic", choices=["dynamic", "static"],
                   help="KV cache of sampling: static preallocates prompt + --max_new_tokens, so that "
                        "transformers compiles the decode step on a GPU (faster per token; compiles again "
                        "when the batch or prompt length changes). Static makes one plain generate() call: "
                        "no shared prefill, no --decode_segment (decode.py)")
    g.add_argument("--decode_segment", type=int, default=256,
                   help="rollout sampling decodes this many new tokens at a time, and drops the rows that "
                        "ended from the batch and the KV cache between segments (a call no longer decodes "
                        "finished rows until its longest is done); 0 = one generate() call. Qwen2.5-VL "
                        "with --decode_cache dynamic (decode.py); other models make one call. Greedy "
                        "validation and eval.py decode in segments of 256, the same tokens as one call")
    g.add_argument("--max_tries", type=int, default=4,
                   help="DAPO dynamic sampling: rounds of sampling to fill the batch with informative groups")
    # tiny: 32 prompts x G = 8 = 256 sequences, a whole sampling round in one call on one rank
    g.add_argument("--gen_batch", type=int, default=512,
                   help="at most this many sequences per generate() call; on a GPU the memory plan sizes "
                        "each call from its prompts' lengths and --max_new_tokens (the start-up plan shows "
                        "the rows it chose)")

    g = p.add_argument_group("VGPO (paper defaults)")
    # one switch for the DAPO baseline; resolved in parse_args, so it wins over a preset
    g.add_argument("--no_vgpo", action="store_true",
                   help="plain DAPO/GRPO: turns intra, inter, compensation and gate off")
    g.add_argument("--intra", action=argparse.BooleanOptionalAction, default=True,
                   help="intra-trajectory re-weighting ψ (Eq. 7-8)")
    g.add_argument("--inter", action=argparse.BooleanOptionalAction, default=True,
                   help="inter-trajectory re-weighting α (Eq. 9-11)")
    g.add_argument("--compensation", action=argparse.BooleanOptionalAction, default=True,
                   help="visual attention compensation c (Eq. 5)")
    g.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                   help="visual gate G (Eq. 6)")
    g.add_argument("--beta", type=float, default=0.3, help="β, compensation strength (Eq. 5; paper 0.3)")
    g.add_argument("--kappa", type=float, default=0.2,
                   help="κ, fraction of tail tokens the gate opens (Eq. 6; paper 0.2)")
    g.add_argument("--gamma", type=float, default=0.5,
                   help="γ, where the tail starts, as a fraction of the response (Eq. 6; paper 0.5)")
    g.add_argument("--schedule", default="linear", choices=vgpo.SCHEDULES,
                   help="compensation schedule (Eq. 5; paper: linear)")

    # controls for an experiment, never for training: each removes one thing VGPO could use
    g = p.add_argument_group("controls (off by default; not the paper)")
    g.add_argument("--control_shuffle_focus", action="store_true",
                   help="shuffle each response's focus values among its own tokens before VGPO: the same "
                        "lengths and values, no link to the image (does VGPO's gain come from vision?)")
    g.add_argument("--control_phi_mean", action="store_true",
                   help="φ_i as a mean over tokens instead of Eq. 9's sum, so α no longer grows with "
                        "length (does VGPO's gain come from length?)")

    g = p.add_argument_group("update")
    # tiny: mini_batch = rollout_batch, one optimizer step per rollout; paper7b: 512 / 128 = 4
    g.add_argument("--mini_batch", type=int, default=32,
                   help="prompts per optimizer step, all ranks together (paper: 128)")
    # tiny, one rank: a mini-batch of 32 x 8 = 256 sequences goes through in 4 forward/backward passes
    g.add_argument("--micro_batch", type=int, default=64,
                   help="sequences per forward/backward on one rank (memory only: the gradient does not "
                        "depend on it)")
    g.add_argument("--ppo_epochs", type=int, default=1, help="passes over each rollout batch")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (paper: 1e-6)")
    g.add_argument("--warmup_steps", type=int, default=0,
                   help="steps of linear warm-up from 0 to --lr (paper: 0)")
    g.add_argument("--lr_schedule", default="constant", choices=["constant", "linear", "cosine"],
                   help="after warm-up: constant (paper), or a linear / cosine decay to 0 at the last step")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (paper: 1e-2)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (paper: 1.0)")
    g.add_argument("--clip_low", type=float, default=0.2, help="ε_low of the clipped ratio (paper: 0.2)")
    # an upper bound wider than the lower lets unlikely tokens gain probability faster, against
    # the entropy collapse of symmetric clipping (DAPO)
    g.add_argument("--clip_high", type=float, default=0.28, help="ε_high, DAPO clip-higher (paper: 0.28)")
    # 0 also saves memory: a positive value loads a frozen copy of the starting model as reference
    g.add_argument("--kl_coef", type=float, default=0.0,
                   help="KL-to-reference coefficient; 0 = off (paper: off; 1e-2 when on)")

    # rarely changed: kernels, column names, data safety limits, resume overrides, logging,
    # memory knobs that do not change the result, and the exotic schedule parameters
    g = p.add_argument_group("advanced")
    g.add_argument("--attn", default="auto", choices=["auto", "flash_attention_2", "sdpa", "eager"],
                   help="attention kernel; auto = flash_attention_2 when importable on GPU, else sdpa")
    g.add_argument("--fast_vision", action=argparse.BooleanOptionalAction, default=True,
                   help="run the vision tower's windows as one attention call per block (without "
                        "flash-attn) and encode each distinct image of a batch once, not once per response; "
                        "same numbers, fewer kernel launches (--no-fast_vision: transformers' own path)")
    # off by default: it runs Python from the hub on this machine
    g.add_argument("--trust_remote_code", action="store_true",
                   help="allow model code from the hub (off unless asked for)")
    g.add_argument("--fsdp_offload", action="store_true",
                   help="with --fsdp: keep the shards, gradients and AdamW state in CPU memory (slower)")
    g.add_argument("--problem_key", default="problem",
                   help="column of the problem text, with <image> placeholders")
    g.add_argument("--answer_key", default="answer", help="column of the gold answer")
    g.add_argument("--images_key", default="images", help="column of the images: paths, bytes or PIL images")
    # off by default: a downloaded data file should not read files elsewhere on the machine
    g.add_argument("--allow_outside_paths", action="store_true",
                   help="let image paths in a data file be absolute or lead out of the file's folder with ..")
    # a few bad rows are the data's; a large share means a wrong column or image root: stop
    g.add_argument("--max_bad_fraction", type=float, default=0.1,
                   help="with --skip_bad_rows: stop when more than this share of the rows read are bad")
    g.add_argument("--allow_changed", nargs="+", default=[], metavar="FLAG",
                   help="with --resume: run-defining flags allowed to differ from the checkpoint's (e.g. "
                        "lr), logged")
    g.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb"],
                   help="also send the metrics to TensorBoard (<out_dir>/tensorboard) or W&B; metrics.jsonl "
                        "is always written")
    g.add_argument("--wandb_project", default="vgpo",
                   help="the Weights & Biases project of --report_to wandb")
    g.add_argument("--micro_tokens", type=int, default=0,
                   help="pack micro-batches up to this many padded tokens instead of --micro_batch rows (0 = "
                        "off)")
    g.add_argument("--logp_chunk", type=int, default=512,
                   help="response positions per checkpointed lm_head block; bounds the logits memory (0 = "
                        "one block)")
    g.add_argument("--comp_start", type=float, default=0.0,
                   help="s0, relative position where compensation starts (paper 0)")
    g.add_argument("--exponent", type=float, default=2.0, help="p of the exp schedule")
    g.add_argument("--step_at", type=float, default=0.5,
                   help="relative position where the step schedule switches on")
    g.add_argument("--kl_kind", default="low_var_kl", choices=["k1", "k2", "low_var_kl"],
                   help="KL estimator (low_var_kl = k3)")
    g.add_argument("--clip_dual", type=float, default=3.0,
                   help="c, dual-clip bound for negative advantages (paper: 3.0)")
    # a step's longest wait at one collective: a sampling round on another rank, or rank 0 writing
    # a checkpoint; torch's default is 30 minutes
    g.add_argument("--dist_timeout", type=float, default=90.0,
                   help="minutes a collective waits for the slowest rank before the run stops, naming the "
                        "phase it waited in")
    g.add_argument("--keep_last", type=int, default=0,
                   help="keep only the N newest checkpoints (0 = keep all; paper7b: 2)")
    return p


# settings that define a run: resuming with any of these changed is refused. Not here: what
# changes only speed, memory or logging (micro_batch, gen_batch, attn, fsdp_offload, logp_chunk,
# val_every, save_every, report_to, ...), which a resumed run may change freely
RUN_IDENTITY = ("model", "train_data", "train_split", "problem_key", "answer_key", "images_key",
                "skip_bad_rows", "seed", "task", "instruction", "bare_answers", "min_pixels", "max_pixels",
                "max_prompt_len", "group_size", "rollout_batch", "mini_batch", "temperature", "top_p",
                "max_new_tokens", "max_tries", "intra", "inter", "compensation", "gate", "beta", "kappa",
                "gamma", "schedule", "comp_start", "exponent", "step_at", "ppo_epochs", "lr",
                "weight_decay", "grad_clip", "clip_low", "clip_high", "clip_dual", "kl_coef", "kl_kind",
                "freeze_vision", "fsdp", "val_data", "val_split", "val_size", "val_max_new_tokens", "reward",
                "warmup_steps", "lr_schedule", "sample_dtype", "copy_prior",
                "control_shuffle_focus", "control_phi_mean")


def parse_args(argv=None, description=""):
    """Parse flags; a --preset replaces the defaults, explicit flags still win."""
    parser = build_parser(description)
    # parsed twice: the first pass only learns --task and --preset, whose values then become
    # the defaults of the second pass
    args = parser.parse_args(argv)
    # the task's settings first, then the preset's: explicit flags win over both
    parser.set_defaults(**{**TASKS[args.task], **PRESETS.get(args.preset, {})})
    args = parser.parse_args(argv)
    if args.no_vgpo and (args.control_shuffle_focus or args.control_phi_mean):
        parser.error("--control_shuffle_focus / --control_phi_mean are controls of VGPO's weights; with "
                     "--no_vgpo there are none to control")
    if args.no_vgpo:
        args.intra = args.inter = args.compensation = args.gate = False
    if args.control_phi_mean and not args.inter:
        parser.error("--control_phi_mean changes φ of the inter-trajectory weight α: it needs --inter")
    # checked here, before any model loads: a wrong flag costs seconds, not a 7B load
    if args.max_steps == 0:
        parser.error("--max_steps 0 trains nothing; give a positive number, or -1 for --epochs passes")
    for name in ("rollout_batch", "mini_batch", "micro_batch", "max_new_tokens", "max_tries", "gen_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.decode_segment < 0:
        parser.error(f"--decode_segment {args.decode_segment}: give the new tokens a segment decodes, or 0")
    if not args.dist_timeout > 0:
        parser.error(f"--dist_timeout {args.dist_timeout}: give the minutes a collective may wait, > 0")
    if not 0 <= args.copy_prior <= 1:
        parser.error(f"--copy_prior {args.copy_prior} is a probability: give a value in [0, 1]")
    if args.copy_prior and args.task == "count":
        parser.error("--copy_prior shapes the colour task's prompts: use it with --task colour or look")
    if args.group_size < 2:
        parser.error("--group_size must be >= 2: GRPO compares each response with its group")
    if args.fsdp_offload and not args.fsdp:
        parser.error("--fsdp_offload needs --fsdp")
    unknown = [k for k in args.allow_changed if k not in RUN_IDENTITY]
    if unknown:
        parser.error(f"--allow_changed {unknown}: not a run-defining flag; those are "
                     f"{', '.join(RUN_IDENTITY)}")
    # mini-batches are whole shares of the rollout: 512 / 128 = 4 (train.update_policy)
    if args.rollout_batch % args.mini_batch:
        parser.error(f"--rollout_batch {args.rollout_batch} is not a multiple of "
                     f"--mini_batch {args.mini_batch}")
    return args


# what a checkpoint written before a flag existed did: its value of that flag. Before --task,
# the embedded task was the count task; before --sample_dtype, generate() read the fp32 policy
BEFORE_THE_FLAG = {"task": "count", "sample_dtype": "float32", "copy_prior": 0.0,
                   "control_shuffle_focus": False, "control_phi_mean": False}


def check_same_run(saved, args, path, master=True):
    """Refuse to resume with a flag that changes the run, unless --allow_changed names it."""
    # the checkpoint's own values win; BEFORE_THE_FLAG fills only the flags it does not have
    saved = {**BEFORE_THE_FLAG, **saved}
    # {flag: (checkpoint's value, now)}, e.g. {"lr": (1e-06, 2e-06)}
    changed = {k: (saved.get(k), getattr(args, k)) for k in RUN_IDENTITY if saved.get(k) != getattr(args, k)}
    # allowed changes are said once (rank 0), since every rank runs this check
    for k in [k for k in changed if k in args.allow_changed]:
        if master:
            print(f"notice: --{k} changed from {changed[k][0]!r} (checkpoint) to {changed[k][1]!r} "
                  f"(--allow_changed); the resumed run no longer matches an unbroken one")
        del changed[k]
    if changed:
        lines = "\n".join(f"  --{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(f"{path} belongs to a different run:\n{lines}\n"
                         f"Use the same settings to resume, a new --out_dir for a new run, or "
                         f"--allow_changed {' '.join(changed)} to change them deliberately.")


def check_machine(args, ranks):
    """The flags that depend on the machine and the ranks, checked (and --sample_dtype auto
    resolved, so that config.json records what ran) once the ranks are known."""
    # FSDP needs a process group, which only torchrun's environment sets up
    if args.fsdp and "RANK" not in os.environ:
        raise SystemExit("--fsdp shards over the ranks of torchrun: start with `torchrun --nproc_per_node N "
                         "train.py --fsdp ...` (N = 1 is allowed, e.g. with --fsdp_offload)")
    gpu = ranks.device.type == "cuda"
    if args.fsdp_offload and not gpu:
        raise SystemExit("--fsdp_offload moves the shards from GPU to CPU memory; without a GPU they are "
                         "in CPU memory already: drop the flag")
    # the weights generate() reads (parallel.sampling_copy); resolved here, so that config.json
    # records "bfloat16" or "float32" and a resume on other hardware is caught by check_same_run
    if args.sample_dtype == "auto":
        args.sample_dtype = "bfloat16" if gpu else "float32"
    elif args.fsdp and args.sample_dtype != ("bfloat16" if gpu else "float32"):
        raise SystemExit(f"--sample_dtype {args.sample_dtype}: under --fsdp the gathered weights are bf16 on "
                         f"a GPU and fp32 on a CPU (FSDP's mixed precision); drop the flag")


# the learning rate of a step, from --lr, --warmup_steps and --lr_schedule
def lr_at(step, total_steps, args):
    """The learning rate of training step `step` (0-based): --warmup_steps of linear
    warm-up, then constant (the paper) or a linear / cosine decay towards 0 at `total_steps`.
    A function of the step alone, so a resumed run gets exactly the same rates.
    Example: lr 1e-6, warm-up 2, cosine over 6 steps -> 5e-7, 1e-6, 1e-6, 8.5e-7, 5e-7, 1.5e-7.
    """
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    if args.lr_schedule == "linear":
        return args.lr * (1 - progress)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))
