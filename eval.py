"""
Score a checkpoint the way the paper reports it, and show whether it keeps looking at the image.

    python eval.py --ckpt out                                   # its own validation task
    python eval.py --ckpt out --image_ablation blank            # ... and with blank images
    python eval.py --ckpt out --focus --plot focus.png          # visual-forgetting diagnostics
    python eval.py --ckpt out/vgpo7b --bench all                # the paper's benchmark table
    python eval.py --ckpt Qwen/Qwen2.5-VL-7B-Instruct out/vgpo7b --bench mathvista --focus --plot f.png
    torchrun --nproc_per_node 8 eval.py --ckpt out/vgpo7b --bench all   # sharded, same numbers

Protocol (the paper's, as Look-Back's script runs it): greedy decoding, up to 2048 new
tokens, the training instruction appended unless the question already carries one; the
answer is the last \\boxed{} of the response, graded by rollout.grade (string match,
mathruler, math-verify with the gold first, or the option letter, never a substring test).
A sample whose image cannot be opened is answered "" and counted wrong, and listed in the
report: it never leaves the denominator.

Outputs, per checkpoint, in --output_dir (default <checkpoint>/eval/): summary.json
({benchmark: {"n", "accuracy", ...}}) and predictions.jsonl (one object per sample).
"""

import argparse
import glob
import json
import math
import os
import sys
import zipfile
from types import SimpleNamespace

import torch
import torch.distributed as dist
from PIL import Image

import infra
import rollout

PAPO_EVAL = "PAPO-Galaxy/PAPO_eval"
# name -> (hub dataset, split, paper 7B VGPO %, paper 7B DAPO %)
BENCHMARKS = {
    "mathvista": (PAPO_EVAL, "AI4Math_MathVista", 74.1, 68.7),
    "mathverse": (PAPO_EVAL, "AI4Math_MathVerse", 71.6, 69.6),
    "mathverse_v": (PAPO_EVAL, "AI4Math_MathVerse_vision_dependent", 67.6, 66.6),
    "wemath": (PAPO_EVAL, "We_Math", 72.5, 70.8),
    "mmk12": (PAPO_EVAL, "PAPO_MMK12", 81.5, 77.0),
    "geo3k": (PAPO_EVAL, "hiyouga_geometry3k", 45.8, 45.6),
    "logicvista": (PAPO_EVAL, "lscpku_LogicVista", 49.4, 47.4),
    "counting": (PAPO_EVAL, "BUAADreamer_clevr_count_70k", 95.5, 85.5),
    "mmmu_pro": (PAPO_EVAL, "MMMU_MMMU_Pro", 40.5, 39.0),
    "mathvista_testmini": ("AI4Math/MathVista", "testmini", None, None),
}
# PAPO-Eval's preprocessing saves some splits under other names: data/papo/<name>.json
PREPROCESSED_NAMES = {"We_Math": ["We-Math_We-Math"],
                      "AI4Math_MathVerse_vision_dependent": ["AI4Math_MathVerse-vision-dependent"]}
PAPO_LAYOUT = ("PAPO_eval keeps its images only in zip files at the dataset root (<split>_images.zip; "
               "We_Math's is We-Math_We-Math_images.zip), while the rows name them "
               "./data/images/<folder>/<file>. Pass --data_dir with the whole hub snapshot, zips included "
               "(they are read in place), or with PAPO-Eval's preprocessed folder (data/papo/<name>.json "
               "and the zips extracted to data/images/)")
BINS = 20  # relative-position bins of the focus curve


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=infra.HelpFormatter)
    # what to score
    p.add_argument("--ckpt", nargs="+", required=True,
                   help="train.py run folder or checkpoint, or a hub id / folder of a Qwen-VL model; "
                        "several = one curve each in --plot")
    p.add_argument("--bench", nargs="+", default=None,
                   help=f"{', '.join(BENCHMARKS)} or all; default: the checkpoint's own validation task "
                        f"(a base model beside a train.py checkpoint borrows its task)")
    p.add_argument("--data_dir", default=None,
                   help="local copy of the benchmarks (offline): a PAPO_eval hub snapshot, PAPO-Eval's "
                        "data/papo + data/images, or split files; for mathvista_testmini, AI4Math/MathVista")
    p.add_argument("--data", nargs="+", default=[],
                   help="extra local .jsonl/.json/.parquet benchmarks (named after the file)")
    p.add_argument("--problem_key", default="problem",
                   help="question column of --data files, as in train.py")
    p.add_argument("--answer_key", default="answer", help="gold answer column of --data files")
    p.add_argument("--images_key", default="images",
                   help="image column of --data files: paths (relative to the file), bytes or PIL images")
    p.add_argument("--allow_outside_paths", action="store_true",
                   help="let image paths in a data file be absolute or lead out of its folder with ..")
    p.add_argument("--limit", type=int, default=0,
                   help="score only the first N samples of each benchmark (0 = all)")
    # how to score it (the paper's protocol by default)
    p.add_argument("--batch", type=int, default=16, help="prompts per greedy generate() call")
    p.add_argument("--max_new_tokens", type=int, default=2048,
                   help="longest response (paper: 2048); a checkpoint's own task uses its validation length")
    p.add_argument("--instruction", default=None,
                   help="appended to each question that has none; default: the training instruction")
    p.add_argument("--min_pixels", type=int, default=0,
                   help="resize images to at least this many pixels (0 = the checkpoint's processor)")
    p.add_argument("--max_pixels", type=int, default=0,
                   help="resize images to at most this many pixels (0 = the checkpoint's processor)")
    # diagnostics
    p.add_argument("--focus", action="store_true",
                   help="visual focus along each response: early/middle/late thirds, correct vs wrong")
    p.add_argument("--plot", default=None,
                   help="PNG of mean focus against relative position, one curve per --ckpt (implies --focus)")
    p.add_argument("--image_ablation", choices=["blank", "noise"], default=None,
                   help="also score with every image replaced by a blank (or noise) image of the same size")
    # where and how
    p.add_argument("--output_dir", default=None,
                   help="for summary.json and predictions.jsonl (default: <checkpoint>/eval, or eval/<name>)")
    p.add_argument("--attn", default="auto", choices=["auto", "flash_attention_2", "sdpa", "eager"],
                   help="attention kernel")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")
    return p


# -----------------------------------------------------------------------------
# checkpoints and benchmark data

def resolve_checkpoint(path):
    """A run folder -> its latest checkpoint; a checkpoint or model folder -> itself;
    anything else must look like a hub id ("org/name")."""
    if os.path.isdir(path):
        latest = infra.latest_checkpoint(path)
        if latest:
            return latest
        if os.path.exists(os.path.join(path, "config.json")):
            return path
        raise SystemExit(f"{path}: neither a model folder (no config.json) nor a train.py run "
                         f"(no checkpoints/latest)")
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise SystemExit(f"no checkpoint at {path}: give a train.py run folder, a checkpoint "
                         f"folder, or a hub id such as Qwen/Qwen2.5-VL-7B-Instruct")
    # "org/name" with no such local folder: a hub id; if it cannot be loaded, load_model says both
    return path


def training_config(ckpt):
    path = os.path.join(ckpt, "vgpo_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return SimpleNamespace(**json.load(f))


def find_split_file(root, split):
    """The file of one benchmark split under `root`, in any of the layouts it comes in:
    the hub's data/<split>-00000-of-00001.parquet, PAPO-Eval's data/papo/<name>.json
    (with its own names for some splits), or DIR/<split>.parquet|jsonl|json."""
    for name in [split] + PREPROCESSED_NAMES.get(split, []):
        # the split's file at the root, one or two folders down, or sharded as <split>-00000-of-N
        for pattern in (f"{name}.*", f"*/{name}.*", f"*/*/{name}.*", f"{name}-*", f"*/{name}-*"):
            hits = sorted(h for h in glob.glob(os.path.join(root, pattern))
                          if h.endswith((".parquet", ".jsonl", ".json")))
            if hits:
                return hits[0]
    return None


class ImageFinder:
    """Opens the image values of a benchmark whose paths are relative to its data root.

    A relative path is looked for on disk under `root` and as a member of any zip at
    `root`, first whole, then with its leading folders dropped one by one (never below
    <folder>/<file>). So "./data/images/geo/1.png" opens root/data/images/geo/1.png
    (PAPO-Eval's extracted layout), root/images/geo/1.png (the data folder given as root),
    or the member geo/1.png (or data/images/geo/1.png) of a zip beside the parquet files
    (the hub's layout), read in place with no extraction. Other values (bytes, PIL
    images, absolute paths) go to rollout.open_image.
    """

    def __init__(self, root, split=None, allow_outside=False):
        self.root, self.split, self.allow_outside = root, split, allow_outside
        self.members = None                     # zip member path -> open ZipFile, built on first use

    def _index(self):
        """Members of the split's own zip when it is there, else of every zip at the root
        (or in data/); a member found in two zips is ambiguous and never guessed."""
        if self.members is None:
            self.members = {}
            zips = sorted(glob.glob(os.path.join(self.root, "*.zip"))
                          + glob.glob(os.path.join(self.root, "data", "*.zip")))
            own = [z for z in zips if os.path.basename(z) in split_zip_names(self.split)]
            for path in own or zips:
                archive = zipfile.ZipFile(path)
                for name in archive.namelist():
                    if not name.endswith("/"):
                        key = name.lstrip("./")
                        # None marks a member two zips share: opening it is refused, never guessed
                        self.members[key] = archive if key not in self.members else None
        return self.members

    def open(self, value):
        if not isinstance(value, str) or os.path.isabs(value):
            return rollout.open_image(value, self.root, self.allow_outside)
        # "./data/images/geo/1.png" -> ["data", "images", "geo", "1.png"]
        parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in parts:                                # leads out of the data folder
            return rollout.open_image(value, self.root, self.allow_outside)
        # the whole path first, then without its leading folders, down to <folder>/<file>:
        # a bare file name could match an unrelated image of another benchmark
        for k in range(max(1, len(parts) - 1)):
            suffix = "/".join(parts[k:])
            path = os.path.join(self.root, *parts[k:])
            if os.path.isfile(path):
                return rollout.open_image(path, self.root)
            if suffix in self._index():
                archive = self.members[suffix]
                if archive is None:
                    raise FileNotFoundError(f"{value}: {suffix} is in more than one zip under {self.root}; "
                                            f"keep only the split's own <split>_images.zip there")
                return rollout.open_image(archive.read(suffix), self.root)
        names = {os.path.basename(z.filename) for z in self._index().values() if z}
        zips = ", ".join(sorted(names)) or "no zip"
        raise FileNotFoundError(f"{value}: not found under {self.root} nor in its zip files ({zips})")


def split_zip_names(split):
    """The image zips PAPO_eval ships for a split: <split>_images.zip, and the names the
    hub uses instead for We_Math and PAPO_MMK12."""
    if split is None:
        return []
    return [f"{split}_images.zip"] + {"We_Math": ["We-Math_We-Math_images.zip"],
                                      "PAPO_MMK12": ["PAPO_MMK12_test_images.zip"]}.get(split, [])


def mathvista_gold(row):
    """MathVista's multiple-choice gold is the option TEXT while its query asks for the
    letter: the gold becomes the letter. Example: choices ["3", "12"], answer "12" -> "B".
    Free-form answers stay as they are."""
    choices = row.get("choices") or []
    if row.get("question_type") == "multi_choice" and row["answer"] in choices:
        return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[choices.index(row["answer"])]
    return row["answer"]


def sharegpt_fields(record):
    """PAPO_eval rows: messages = [user "<image>question", assistant gold]."""
    turns = record["messages"]
    text = lambda t: t.get("content", t.get("value"))
    role = lambda t: t.get("role", t.get("from"))
    question = next(text(t) for t in turns if role(t) in ("user", "human"))
    answer = next((text(t) for t in turns if role(t) in ("assistant", "gpt")), None)
    return question, answer


def read_rows(table, fields):
    """(question, answer, images) of every row; a row whose text is not valid UTF-8 comes
    back as (BadRowError, None, None): a bad row counted wrong, not a crash mid-eval."""
    rows = []
    for k in range(len(table)):
        try:
            rows.append(fields(table[k]))
        except UnicodeDecodeError as e:
            rows.append((rollout.BadRowError(f"its text is not valid UTF-8 ({e})"), None, None))
    return rows


def load_benchmark(name, args):
    """-> (list of samples {"id", "question", "answer", "images" (raw values)}, image root)."""
    import datasets

    if name in BENCHMARKS:
        repo, split, _, _ = BENCHMARKS[name]
        if repo == PAPO_EVAL:
            root = args.data_dir
            if root is None:
                try:
                    from huggingface_hub import snapshot_download
                    root = snapshot_download(repo, repo_type="dataset")
                except Exception as e:
                    raise SystemExit(f"benchmark {name}: cannot download {repo} ({type(e).__name__}). "
                                     f"Offline? Copy the dataset (its split files and images) to a "
                                     f"folder and pass --data_dir FOLDER.") from None
            path = find_split_file(root, split)
            if path is None:
                raise SystemExit(f"benchmark {name}: no file for split {split!r} under {root}; expected "
                                 f"e.g. {os.path.join(root, split + '.parquet')}")
            # a split file holds one split; load_table reads it under the name "train"
            table = rollout.load_table(path, "train", ("messages", "images"))
            rows = read_rows(table, lambda r: sharegpt_fields(r) + (r["images"],))
            folder = os.path.dirname(os.path.abspath(path))
            if folder.endswith(os.path.join("data", "papo")):   # PAPO-Eval's paths start beside data/
                root = os.path.dirname(os.path.dirname(folder))
        else:  # AI4Math/MathVista testmini: query (with hint), answer, decoded_image
            try:
                table = datasets.load_dataset(args.data_dir or repo, split=split)
            except Exception as e:
                raise SystemExit(f"benchmark {name}: cannot load {repo} split {split} ({type(e).__name__}); "
                                 f"offline, pass --data_dir with a local copy of it") from None
            rows = read_rows(table, lambda r: (r["query"], mathvista_gold(r), [r["decoded_image"]]))
            odd = sum(r["question_type"] == "multi_choice" and r["answer"] not in (r["choices"] or [])
                      for r in table.select_columns(["question_type", "answer", "choices"]))
            if odd:
                print(f"warning: {name}: {odd} multiple-choice rows whose answer is not one of their choices "
                      f"keep the answer text as gold", file=sys.stderr)
            root = "."
    else:
        keys = (args.problem_key, args.answer_key, args.images_key)
        table = rollout.load_table(name, "train", keys)
        rows = read_rows(table, lambda r: tuple(r[k] for k in keys))
        root = os.path.dirname(os.path.abspath(name))
    # one sample per row, whatever happens to it: a bad row is kept, marked with its reason,
    # so that it is counted wrong in the denominator instead of silently leaving it
    samples = []
    for k, (question, answer, images) in enumerate(rows):
        if isinstance(question, rollout.BadRowError) or question is None or not str(question).strip():
            reason = str(question) if question is not None else "no question text"
            samples.append({"id": k, "question": "", "answer": str(answer or ""), "images": [],
                            "error": reason})
            continue
        if answer is None or str(answer).strip() == "":
            raise SystemExit(f"benchmark {name}, sample {k}: no gold answer; fix the data or leave "
                             f"the sample out of the file")
        images = images if isinstance(images, (list, tuple)) else [images] if images is not None else []
        question = str(question)
        # questions without placeholders get them in front, one per image (as the hub rows do)
        if images and "<image>" not in question:
            question = "<image>" * len(images) + question
        sample = {"id": k, "question": question, "answer": str(answer).strip(), "images": images}
        if question.count("<image>") != len(images):      # the processor would fail the whole batch
            marks = question.count("<image>")
            sample["error"] = (f"{marks} <image> placeholders but {len(images)} image(s); "
                               f"each image needs one placeholder")
        samples.append(sample)
    if args.limit:
        samples = samples[:args.limit]
    return samples, root


def own_validation(cfg):
    """The validation set a train.py run used (the synthetic held-out set by default)."""
    data = infra.open_data(cfg.val_data, cfg.val_split, cfg, seed_offset=10_000, size=cfg.val_size)
    samples = []
    for k in range(len(data)):
        ex = data[k]
        samples.append({"id": k, "question": ex["problem"], "answer": ex["answer"], "images": ex["images"]})
    return samples


# -----------------------------------------------------------------------------
# scoring

def ablate(image, mode, seed):
    """A blank (black) or uniform-noise image of the same size."""
    if mode == "blank":
        return Image.new("RGB", image.size, (0, 0, 0))
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (image.size[1], image.size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def prompt_text(question, instruction):
    """The user text sent: the question, plus the instruction unless it already has one."""
    return question if not instruction or rollout.has_instruction(question) else f"{question} {instruction}"


@torch.no_grad()
def run_benchmark(policy, processor, samples, finder, args, instruction, bare, max_new_tokens, ablation, rank,
                  world, device):
    """Greedy answers for this rank's shard of `samples`; returns one record per sample.

    A sample whose images cannot be opened, or whose <image> marks and images disagree,
    is answered "" and counted wrong with the reason in its record: it never leaves the
    denominator, and it never takes the rest of its batch down with it.
    """
    from tqdm import tqdm

    # every world-th sample: each rank answers a share, the records are gathered at the end
    mine = samples[rank::world]
    records = []
    for start in tqdm(range(0, len(mine), args.batch), disable=rank != 0, desc="eval", leave=False):
        batch_samples, examples, pending = mine[start:start + args.batch], [], []
        for smp in batch_samples:
            # one instruction per prompt: PAPO_eval's questions carry their own, nothing is appended
            prompt = prompt_text(smp["question"], instruction)
            rec = {"id": smp["id"], "question": smp["question"], "prompt": prompt, "gold": smp["answer"],
                   "image_ok": True, "response": "", "answer": None, "correct": False}
            # a bad row (placeholders and images disagree, text not UTF-8) is wrong, with its reason,
            # and stays in the denominator; passed to the processor it would fail the whole batch
            if "error" in smp:
                rec.update(bad_row=True, error=smp["error"])
                records.append(rec)
                continue
            try:
                images = [finder.open(v) for v in smp["images"]]
                if ablation:
                    images = [ablate(im, ablation, smp["id"] * 31 + j) for j, im in enumerate(images)]
            except Exception as e:
                rec.update(image_ok=False, error=f"{type(e).__name__}: {e}")
                records.append(rec)                      # counted wrong, never dropped
                continue
            examples.append({"problem": prompt, "images": images, "answer": smp["answer"]})
            pending.append(rec)
        if not examples:
            continue
        # the instruction is already in each prompt (prompt_text), so none is added here;
        # greedy and graded exactly as train.py's validation
        answers = rollout.answer_greedily(policy, processor, examples, "", max_new_tokens=max_new_tokens,
                                          bare=bare, device=device, focus=args.focus)
        for rec, answer in zip(pending, answers):
            focus = answer.pop("focus", None)                    # (T,): one score per response token
            rec.update(answer)
            if focus is not None:
                # the early / middle / late thirds and the curve, as training's log defines them
                mask = torch.ones(1, len(focus), dtype=torch.bool)
                rec["focus_thirds"] = rollout.focus_profile(focus[None], mask)[0].tolist()
                rec["focus_bins"] = rollout.focus_profile(focus[None], mask, BINS)[0].tolist()
            records.append(rec)
    if world > 1:
        gathered = [None] * world
        # CPU objects: the gloo half of the process group carries them, also on GPU machines
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    return sorted(records, key=lambda r: r["id"])


def check_images(name, samples, finder, first=16):
    """Open the images of the first samples before any generation: when most of them
    fail, the layout is wrong (e.g. the image zips were left behind), and the run stops
    with the fix instead of scoring every sample as wrong."""
    # a few samples are enough to tell a wrong layout (every image fails) from a few bad files
    checked = [s for s in samples if "error" not in s and s["images"]][:first]
    errors = []
    for smp in checked:
        try:
            [finder.open(v) for v in smp["images"]]
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    if checked and len(errors) > len(checked) / 2:
        raise SystemExit(f"benchmark {name}: {len(errors)} of {len(checked)} samples checked have images "
                         f"that "
                         f"cannot be opened (first: {errors[0]}).\n{PAPO_LAYOUT}.")


def check_failures(name, summary, records):
    """A benchmark where most samples failed (images that do not open, or bad rows) is an
    error, never a score."""
    # counted after the run too: a score made mostly of failures is no score
    failed = [r for r in records if not r["image_ok"] or r.get("bad_row")]
    if len(failed) > summary["n"] / 2:
        shown = "\n  ".join(f"sample {r['id']}: {r['error']}" for r in failed[:3])
        raise SystemExit(f"benchmark {name}: {summary['image_failures']} of {summary['n']} samples have "
                         f"images that cannot be opened and {summary['bad_rows']} are bad rows; "
                         f"the first:\n  {shown}\n"
                         f"{PAPO_LAYOUT}.")


def summarise(records, with_focus):
    """accuracy over every sample (failed images included), and focus by correctness."""
    # n counts every sample: failed images and bad rows are wrong answers, never dropped
    n = len(records)
    out = {"n": n, "accuracy": sum(r["correct"] for r in records) / max(n, 1),
           "image_failures": sum(not r["image_ok"] for r in records),
           "bad_rows": sum(r.get("bad_row", False) for r in records)}
    if with_focus:
        for label, group in (("correct", [r for r in records if r["correct"] and "focus_thirds" in r]),
                             ("wrong", [r for r in records if not r["correct"] and "focus_thirds" in r])):
            if not group:
                continue
            early, middle, late = (_nanmean([r["focus_thirds"][i] for r in group]) for i in range(3))
            # a ratio of cosines only means something when the early mean is positive
            out[f"focus_{label}"] = {"n": len(group), "early": early, "middle": middle, "late": late,
                                     "late_minus_early": late - early,
                                     "late_over_early": late / early if early > 0 else float("nan")}
    return out


def _nanmean(values):
    """Mean over the responses that have this third at all (short ones may not)."""
    # each response counts once, as in rollout.focus_profile and training's log
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def mean_curve(records):
    """Mean focus per relative-position bin over all responses that reach the bin."""
    # bins a response does not reach (a 2-token response has 2 of 20) are nan: skipped
    total, count = [0.0] * BINS, [0] * BINS
    for r in records:
        for b, v in enumerate(r.get("focus_bins", [])):
            if not math.isnan(v):
                total[b] += v
                count[b] += 1
    return [t / c if c else float("nan") for t, c in zip(total, count)]


def plot_curves(curves, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [(b + 0.5) / BINS for b in range(BINS)]        # the centre of each relative-position bin
    for label, curve in curves.items():
        pts = [(xi, yi) for xi, yi in zip(x, curve) if not math.isnan(yi)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("relative position in the response (0 = first token, 1 = last)")
    ax.set_ylabel("mean visual focus  cos(h_t, v)")
    ax.set_title("Does the model keep looking at the image?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(table, args):
    ablation = args.image_ablation
    head = ["checkpoint", "benchmark", "n", "images failed", "bad rows", "accuracy %"]
    if ablation:
        # drop = accuracy lost without the image: how much the score needs the image at all
        head += [f"{ablation} images %", "drop"]
    if args.focus:
        head += ["focus early", "focus late", "late/early (correct)", "late/early (wrong)"]
    head += ["paper 7B VGPO %", "paper 7B DAPO %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ckpt, label, s in table:
        paper = BENCHMARKS.get(label, (None, None, None, None))
        row = [ckpt, label, str(s["n"]), str(s["image_failures"]), str(s["bad_rows"]),
               f"{100 * s['accuracy']:.1f}"]
        if ablation:
            a = s[f"accuracy_{ablation}"]
            row += [f"{100 * a:.1f}", f"{100 * (s['accuracy'] - a):+.1f}"]
        if args.focus:
            # early / late over all responses: the correct and wrong groups, weighted by size
            groups = [s[k] for k in ("focus_correct", "focus_wrong") if k in s]
            n = sum(g["n"] for g in groups) or 1
            early = sum(g["early"] * g["n"] for g in groups) / n
            late = sum(g["late"] * g["n"] for g in groups) / n
            ratio = lambda k: ("-" if k not in s or math.isnan(s[k]["late_over_early"])
                               else f"{s[k]['late_over_early']:.2f}")
            row += [f"{early:.3f}", f"{late:.3f}", ratio("focus_correct"), ratio("focus_wrong")]
        row += [f"{paper[2]:.1f}" if paper[2] else "-", f"{paper[3]:.1f}" if paper[3] else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# main: each checkpoint in turn, then one table (and one plot) for all of them

def score_checkpoint(ckpt, cfg, names, args, rank, world, device):
    """Every benchmark of one checkpoint: summary.json and predictions.jsonl written to its
    output folder. Returns the summary {benchmark: {...}} and its mean focus curve."""
    master = rank == 0
    load_args = SimpleNamespace(attn=args.attn, trust_remote_code=args.trust_remote_code,
                                min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    try:
        model, processor, attn = infra.load_model(ckpt, load_args, device)
    except ValueError as err:                       # a named, explained failure: no traceback
        raise SystemExit(str(err)) from None
    model.eval()
    policy = infra.Policy(model)                    # policy(fn, *args) runs fn(model, *args), as in training
    # the instruction the checkpoint was trained with, so that it is scored on its own prompt
    instruction = args.instruction if args.instruction is not None else (
        cfg.instruction if cfg is not None else rollout.INSTRUCTION)
    jobs = []  # (name, samples, image finder, bare answers, max new tokens)
    if not names and not args.data:
        # the run's own validation task, answered as validation answers it (bare answers allowed)
        jobs.append(("validation", own_validation(cfg), ImageFinder("."), cfg.bare_answers,
                     cfg.val_max_new_tokens))
    for name in names + args.data:
        samples, root = load_benchmark(name, args)
        label = name if name in BENCHMARKS else os.path.splitext(os.path.basename(name))[0]
        split = BENCHMARKS[name][1] if name in BENCHMARKS else None
        finder = ImageFinder(root, split, args.allow_outside_paths)
        # a wrong image layout stops here, before any generation, with the fix
        check_images(label, samples, finder)
        jobs.append((label, samples, finder, False, args.max_new_tokens))
    summary, predictions, all_records = {}, [], []
    for label, samples, finder, bare, max_new in jobs:
        if master:
            print(f"{ckpt}: {label} ({len(samples)} samples, attention {attn}, "
                  f"{rollout.describe_sampling(0, 1.0)})", file=sys.stderr)
        records = run_benchmark(policy, processor, samples, finder, args, instruction, bare, max_new,
                                None, rank, world, device)
        summary[label] = summarise(records, args.focus)
        check_failures(label, summary[label], records)
        # one instruction per prompt: PAPO_eval's questions carry their own
        own = sum(rollout.has_instruction(s["question"]) for s in samples)
        summary[label]["instruction"] = (
            "none" if not instruction and not own else
            f"the question's own (already in {own} of {len(samples)} questions), nothing appended"
            if own == len(samples) else
            f"appended to {len(samples) - own} of {len(samples)} questions: {instruction!r}"
            + (f"; the other {own} carry their own" if own else ""))
        all_records += records
        predictions += [dict(r, benchmark=label) for r in records]
        if args.image_ablation:
            # the same samples with blank (or noise) images: how much of the score needs the image
            ablated = run_benchmark(policy, processor, samples, finder, args, instruction, bare, max_new,
                                    args.image_ablation, rank, world, device)
            summary[label][f"accuracy_{args.image_ablation}"] = summarise(ablated, False)["accuracy"]
            predictions += [dict(r, benchmark=label, ablation=args.image_ablation) for r in ablated]
    out_dir = args.output_dir or (os.path.join(ckpt, "eval") if os.path.isdir(ckpt)
                                  else os.path.join("eval", ckpt.replace("/", "__")))
    if len(args.ckpt) > 1 and args.output_dir:      # one sub-folder per checkpoint
        out_dir = os.path.join(args.output_dir, os.path.basename(os.path.normpath(ckpt)))
    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            for r in predictions:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {out_dir}/summary.json and predictions.jsonl", file=sys.stderr)
    return summary, mean_curve(all_records) if args.focus else None


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.plot:
        args.focus = True
    names = args.bench or []
    if names == ["all"]:
        names = [n for n in BENCHMARKS if n != "mathvista_testmini"]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown}; valid: {', '.join(BENCHMARKS)} or all")
    # under torchrun every rank answers a share of each benchmark (gloo carries the records)
    rank, _, world, device = infra.setup_distributed()
    ckpts = [resolve_checkpoint(c) for c in args.ckpt]

    # a model without a validation task of its own (e.g. the base model beside its trained
    # checkpoint) is scored on the task of the first train.py checkpoint in --ckpt
    configs = {c: training_config(c) for c in ckpts}
    fallback = next((cfg for cfg in configs.values() if cfg is not None), None)
    table, curves = [], {}
    for ckpt in ckpts:
        cfg = configs[ckpt] or fallback
        if not names and not args.data and cfg is None:
            raise SystemExit(f"{ckpt} is not a train.py checkpoint, so it has no validation task of its "
                             f"own; pass --bench (or --data)")
        summary, curve = score_checkpoint(ckpt, cfg, names, args, rank, world, device)
        table += [(ckpt, label, s) for label, s in summary.items()]
        curves[ckpt] = curve
    if rank == 0:
        print(markdown_table(table, args))
        if args.plot:
            plot_curves(curves, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
