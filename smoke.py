"""
First contact: run the 7B preset's whole code path on a small random model, in minutes,
before spending GPU hours on the real one.

    python smoke.py                    # every GPU of this machine, one rank each (torchrun, NCCL);
                                       # 2 CPU ranks (gloo) without one
    python smoke.py --nproc 8 --work_dir /tmp/smoke

What it builds in --work_dir, each a copy of a real artefact's layout at toy size:
  - model/: a random Qwen2.5-VL (the real architecture, a character tokenizer) whose
    generation_config.json carries what Qwen2.5-VL-7B-Instruct ships (do_sample, temperature
    0.1, top_p 0.001, top_k 1, repetition_penalty 1.05), so sampling that inherits it shows;
  - PAPO_ViRL39K_train/ and PAPO_MMK12_test/: hub folders, data/train-00000-of-00001.parquet
    (MMK12's only split is train), rows in the ViRL39K schema with images as bytes;
  - PAPO_eval/: the hub snapshot, data/<split>-00000-of-00001.parquet in ShareGPT style with
    PAPO's instruction in each question and images only in <split>_images.zip at the root.
What it runs:
  1. torchrun train.py --preset paper7b (FSDP2, gradient checkpointing, bf16 on GPU, the
     preset's pixel bounds) for 2 steps with small batches. A random model is almost never
     right, so the rewards are replaced by 0, 1, 0, 1, ... in each group (every group is
     informative and the update runs); everything else is the preset's code.
  2. torchrun eval.py --bench counting wemath on the checkpoint it wrote.
Then it checks what they wrote and prints "smoke test passed", or exits non-zero.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import zipfile

import torch

import rollout
import tiny

# the children run from here, so train.py and eval.py are found whatever the caller's folder
HERE = os.path.dirname(os.path.abspath(__file__))

# Qwen2.5-VL-7B-Instruct's generation_config.json, as shipped (the token ids stay the model's own).
# Any generate() argument not passed explicitly comes from here: top_k 1 with repetition_penalty
# 1.05 would turn "sampling" into greedy decoding with a penalty, all G responses of a group the same
QWEN_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
                          "repetition_penalty": 1.05}

# the instruction that ends every PAPO_eval question (also the one training appends)
PAPO_INSTRUCTION = rollout.INSTRUCTION


def png_bytes(image):
    # images as PNG bytes, the form the hub's parquet files and zips hold them in
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shipped_generation_config(model_dir):
    """Give a model folder the generation settings the real 7B checkpoint ships."""
    path = os.path.join(model_dir, "generation_config.json")
    # the tiny model's own file first: its token ids (eos, pad) are kept, the settings replaced
    with open(path) as f:
        config = json.load(f)
    config.update(QWEN_GENERATION_CONFIG)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return model_dir


def write_hub_folder(root, split, records):
    """A hub dataset snapshot with one split: <root>/data/<split>-00000-of-00001.parquet."""
    import datasets
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    # the hub's file name, so that datasets.load_dataset(root, split=split) finds the split by it
    path = os.path.join(root, "data", f"{split}-00000-of-00001.parquet")
    datasets.Dataset.from_list(records).to_parquet(path)
    return root


def virl_records(n, seed):
    """Rows in the ViRL39K / MMK12 schema: problem with <image> marks, answer, images as bytes.

    As on the hub: the mark sometimes mid-text, some rows with two images (one mark each),
    and some answers in LaTeX.
    """
    rows = []
    for k in range(n):
        ex = tiny.counting_example(seed, k)
        images, problem, answer = [ex["images"][0]], ex["problem"], ex["answer"]
        # every third row: the <image> mark mid-sentence, not in front
        if k % 3 == 1:
            problem = "Look at <image> and count the squares."
        # every fifth row: two images, two marks (the second image from another seed)
        if k % 5 == 2:
            images.append(tiny.counting_example(seed + 1, k)["images"][0])
            problem = "Compare <image> with <image>: how many squares are in the first?"
        # every fourth row: the gold in LaTeX, the same value: "3" -> \frac{6}{2}
        if k % 4 == 3:
            answer = f"\\frac{{{2 * int(answer)}}}{{2}}"
        # {"bytes", "path"}: the struct the hub's Image feature stores in parquet
        rows.append({"problem": problem, "answer": answer,
                     "images": [{"bytes": png_bytes(im), "path": None} for im in images]})
    return rows


# (split, its image zip): one split with the usual <split>_images.zip, and We_Math, whose zip
# the hub names differently; eval.py must find both
PAPO_SPLITS = (("BUAADreamer_clevr_count_70k", "BUAADreamer_clevr_count_70k_images.zip"),
               ("We_Math", "We-Math_We-Math_images.zip"))


def write_papo_eval(root, layout, splits=PAPO_SPLITS, n=4, missing=()):
    """PAPO-Galaxy/PAPO_eval at toy size, in one of the two layouts it comes in.

    "snapshot" (the hub): data/<split>-00000-of-00001.parquet with `messages` (ShareGPT,
    role/content; the user turn ends with PAPO's instruction), `images` as
    "./data/images/<folder>/<file>.png" and `id`; the images only in a zip at the root
    (We_Math's is We-Math_We-Math_images.zip), members "<folder>/<file>.png".
    "preprocessed" (PAPO-Eval's script): data/papo/<name>.json, a JSON list without `id`
    (We_Math saved as We-Math_We-Math.json), and the zips extracted to data/images/.
    `missing`: sample indices whose image file is left out.
    """
    import datasets
    for split, zip_name in splits:
        folder = split.lower()
        # files: zip member (or data/images/ path) -> PNG bytes
        records, files = [], {}
        for k in range(n):
            ex = tiny.counting_example(99, k)
            # the question already ends with the instruction: eval.py must append nothing more
            question = "<image>How many squares? " + PAPO_INSTRUCTION
            records.append({"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": ex["answer"]}],
                            "images": [f"./data/images/{folder}/{k}.png"], "id": k})
            # a left-out image: the row still names it, as a broken download would
            if k not in missing:
                files[f"{folder}/{k}.png"] = png_bytes(ex["images"][0])
        # snapshot: the rows say ./data/images/<folder>/<file>, but the members are only
        # <folder>/<file> in a zip at the root: the mismatch eval.py's ImageFinder resolves
        if layout == "snapshot":
            os.makedirs(os.path.join(root, "data"), exist_ok=True)
            datasets.Dataset.from_list(records).to_parquet(
                os.path.join(root, "data", f"{split}-00000-of-00001.parquet"))
            with zipfile.ZipFile(os.path.join(root, zip_name), "w") as z:
                for name, data in files.items():
                    z.writestr(name, data)
        else:
            os.makedirs(os.path.join(root, "data", "papo"), exist_ok=True)
            # PAPO-Eval's script saves We_Math under another name (eval.PREPROCESSED_NAMES)
            name = "We-Math_We-Math" if split == "We_Math" else split
            with open(os.path.join(root, "data", "papo", f"{name}.json"), "w") as f:
                json.dump([{k: v for k, v in r.items() if k != "id"} for r in records], f, indent=2)
            # extracted, at the very paths the rows name (relative to the folder above data/)
            for name, data in files.items():
                os.makedirs(os.path.join(root, "data", "images", os.path.dirname(name)), exist_ok=True)
                with open(os.path.join(root, "data", "images", name), "wb") as f:
                    f.write(data)
    return root


def alternating_rewards(texts, golds, bare=False):
    """0, 1, 0, 1, ... : every group of an even size holds both, so every group trains."""
    # train.py lays out a group's G responses next to each other (repeat_interleave), so with
    # G = 8 each group gets four 0s and four 1s and a mean reward of exactly 0.5
    return [float(k % 2) for k in range(len(texts))]


def run(cmd):
    # flushed before the child starts, so the command shows above the child's own output
    print("$ " + " ".join(cmd), flush=True)
    # one OpenMP thread per rank: N ranks of one machine would otherwise each start one
    # thread per core and fight over them
    result = subprocess.run(cmd, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode != 0:
        raise SystemExit(f"smoke test FAILED (exit {result.returncode}): {' '.join(cmd)}")


def default_ranks():
    """Every GPU of the machine, one rank each (NCCL binds one GPU to a rank); 2 CPU ranks
    without a GPU. A world of one skips every collective, so one GPU tests less (said then)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def check_ranks(nproc):
    """More ranks than GPUs cannot start (two NCCL ranks on one GPU fail); say so first."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and nproc > gpus:
        raise SystemExit(f"--nproc {nproc}: this machine has {gpus} GPU(s), and each rank needs its own "
                         f"(NCCL); pass --nproc {gpus}")
    if nproc < 1:
        raise SystemExit("--nproc must be >= 1")
    if nproc == 1:
        print("smoke test on one rank: the collectives between ranks are not exercised (2+ GPUs test them)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=default_ranks(),
                   help="ranks (default: every GPU; 2 CPU ranks without a GPU)")
    p.add_argument("--work_dir", default="out/smoke",
                   help="where the model, the data and the run are written")
    # torchrun starts this file once per rank with --train_child; REMAINDER hands the rest to train.py
    p.add_argument("--train_child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal: one rank
    args = p.parse_args()
    if args.train_child is not None:           # a rank of step 1: train.py with alternating rewards
        import train
        # patched inside each rank's own process (torchrun starts fresh interpreters):
        # train.rewards looks rollout.accuracy_rewards up at call time, so the patch reaches it
        # and the run keeps the preset's --reward accuracy
        rollout.accuracy_rewards = alternating_rewards
        train.main(args.train_child)
        return

    check_ranks(args.nproc)
    work = os.path.abspath(args.work_dir)
    model = os.path.join(work, "model")
    # random weights, built once and reused by later runs: the test is of the code path, not
    # of learning
    if not os.path.exists(model):
        tiny.build_tiny_model(model, seed=0, hidden=256, layers=4, vision_hidden=128, vision_depth=4)
        write_shipped_generation_config(model)
    # training and validation rows from different seeds: different images; MMK12's split is "train"
    virl = write_hub_folder(os.path.join(work, "PAPO_ViRL39K_train"), "train", virl_records(64, 5))
    mmk12 = write_hub_folder(os.path.join(work, "PAPO_MMK12_test"), "train", virl_records(8, 6))
    papo = write_papo_eval(os.path.join(work, "PAPO_eval"), "snapshot")
    out = os.path.join(work, "run")
    # this interpreter's torchrun (the venv's torch), on a fixed port other than torchrun's
    # default 29500, which another job of this machine may hold
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                "--master_port", "29531"]
    n = args.nproc
    # Per step: 2n prompts, 2 per rank; G = 8 (the preset's), so 16 sequences a rank, one
    # generate() call with --gen_batch 16; --mini_batch n makes 2 optimizer steps a step.
    # A rerun in the same --work_dir resumes the finished run instead of starting over.
    run(torchrun + [os.path.basename(__file__), "--train_child", "--preset", "paper7b", "--model", model,
                    "--train_data", virl, "--val_data", mmk12, "--out_dir", out, "--max_steps", "2",
                    "--rollout_batch", str(2 * n), "--mini_batch", str(n), "--micro_batch", "4",
                    "--gen_batch", "16", "--max_new_tokens", "16", "--val_max_new_tokens", "16",
                    "--val_size", "8", "--val_batch", "4", "--lr", "1e-4"]
        + (["--resume"] if os.path.exists(os.path.join(out, "checkpoints")) else []))
    # the two PAPO_eval splits written above, their images read from the zips in place
    run(torchrun + ["eval.py", "--ckpt", out, "--bench", "counting", "wemath", "--data_dir", papo,
                    "--max_new_tokens", "16", "--batch", "4"])

    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # every failed check is collected, so that one run reports all of them
    problems = []
    if [r["step"] for r in rows] != [1, 2]:
        problems.append(f"metrics.jsonl has steps {[r['step'] for r in rows]}, expected [1, 2]")
    # alternating rewards make every group informative: DAPO's filter must keep all 2n
    if not all(r["updates"] > 0 and r["kept_groups"] == 2 * n for r in rows):
        problems.append("a step kept fewer groups or ran no update: " + json.dumps(rows[-1]))
    # exactly 0.5: half of every group's rewards are 1 (alternating_rewards)
    if not all(r["reward"] == 0.5 for r in rows):
        problems.append("the alternating rewards did not reach the log")
    # step_000002 sorts last: the checkpoint eval.py resolved the run folder to
    ckpts = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_"))
    with open(os.path.join(out, "checkpoints", ckpts[-1], "eval", "summary.json")) as f:
        summary = json.load(f)
    # n = 4 rows per split (write_papo_eval), every image found: none failed, none dropped
    for name in ("counting", "wemath"):
        s = summary[name]
        if s["n"] != 4 or s["image_failures"] or s["bad_rows"]:
            problems.append(f"eval {name}: {s}")
    if problems:
        raise SystemExit("smoke test FAILED:\n  " + "\n  ".join(problems))
    device = f"{n} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"{n} CPU ranks"
    print(f"smoke test passed on {device}: 2 training steps of the paper7b path "
          f"({sum(r['updates'] for r in rows)} updates, val_acc {rows[-1]['val_acc']:.3f}), "
          f"eval on PAPO_eval's hub layout with zipped images")


if __name__ == "__main__":
    main()
