"""
The paper's benchmarks as eval.py reads them: their names and hub splits, the layouts a
local copy may have (the hub snapshot with its image zips, PAPO-Eval's preprocessed
folder, split files), finding each sample's images, and the rows as samples
{"id", "question", "answer", "images"}. Skip it on a first read of eval.py.
"""

import glob
import os
import sys
import zipfile


import dataset

PAPO_EVAL = "PAPO-Galaxy/PAPO_eval"
# name -> (hub dataset, split, paper 7B VGPO %, paper 7B DAPO %)
# The paper's figures are printed beside ours in the table; None = no published figure.
# GeoMath, in the paper's table, has no public copy, so it has no entry here.
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
# (find_split_file tries the split's own name first, then these)
PREPROCESSED_NAMES = {"We_Math": ["We-Math_We-Math"],
                      "AI4Math_MathVerse_vision_dependent": ["AI4Math_MathVerse-vision-dependent"]}
# the fix printed when most images fail to open (check_images, check_failures): the usual
# cause is a copy of the dataset made without its zips
PAPO_LAYOUT = ("PAPO_eval keeps its images only in zip files at the dataset root (<split>_images.zip; "
               "We_Math's is We-Math_We-Math_images.zip), while the rows name them "
               "./data/images/<folder>/<file>. Pass --data_dir with the whole hub snapshot, zips included "
               "(they are read in place), or with PAPO-Eval's preprocessed folder (data/papo/<name>.json "
               "and the zips extracted to data/images/)")
# relative-position bins of the focus curve, each 1/20 of a response: a response of T tokens
# reaches at most T of them (mean_curve skips the bins it does not reach)


def find_split_file(root, split):
    """The file of one benchmark split under `root`, in any of the layouts it comes in:
    the hub's data/<split>-00000-of-00001.parquet, PAPO-Eval's data/papo/<name>.json
    (with its own names for some splits), or DIR/<split>.parquet|jsonl|json."""
    for name in [split] + PREPROCESSED_NAMES.get(split, []):
        # the split's file at the root, one or two folders down, or sharded as <split>-00000-of-N
        for pattern in (f"{name}.*", f"*/{name}.*", f"*/*/{name}.*", f"{name}-*", f"*/{name}-*"):
            # sorted, so that the pick does not depend on the file system's order; PAPO_eval
            # ships each split as one file (-00000-of-00001), so the first hit is the whole split
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
    images, absolute paths) go to dataset.open_image.
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
            # the split's own zip alone when present: another benchmark's zip may hold a
            # member of the same name (geo/1.png), which would be ambiguous
            own = [z for z in zips if os.path.basename(z) in split_zip_names(self.split)]
            for path in own or zips:
                # kept open: members are read on demand, never extracted to disk
                archive = zipfile.ZipFile(path)
                for name in archive.namelist():
                    # folder entries end with "/" and are not images
                    if not name.endswith("/"):
                        # "./geo/1.png" and "geo/1.png" name the same member
                        key = name.lstrip("./")
                        # None marks a member two zips share: opening it is refused, never guessed
                        self.members[key] = archive if key not in self.members else None
        return self.members

    def open(self, value):
        # bytes, PIL images and absolute paths need no search; open_image applies the
        # outside-path rule to an absolute path
        if not isinstance(value, str) or os.path.isabs(value):
            return dataset.open_image(value, self.root, self.allow_outside)
        # "./data/images/geo/1.png" -> ["data", "images", "geo", "1.png"]
        parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in parts:                                # leads out of the data folder
            return dataset.open_image(value, self.root, self.allow_outside)
        # the whole path first, then without its leading folders, down to <folder>/<file>:
        # a bare file name could match an unrelated image of another benchmark.
        # ["data", "images", "geo", "1.png"] tries data/images/geo/1.png, images/geo/1.png,
        # geo/1.png; a one-part path (a bare file name) is tried as it is
        for k in range(max(1, len(parts) - 1)):
            suffix = "/".join(parts[k:])
            path = os.path.join(self.root, *parts[k:])
            # under root by construction (no ".." in parts): no outside-path check needed
            if os.path.isfile(path):
                return dataset.open_image(path, self.root)
            if suffix in self._index():
                archive = self.members[suffix]
                if archive is None:
                    raise FileNotFoundError(f"{value}: {suffix} is in more than one zip under {self.root}; "
                                            f"keep only the split's own <split>_images.zip there")
                return dataset.open_image(archive.read(suffix), self.root)
        # the error names the zips searched, so a missing split zip shows at once
        names = {os.path.basename(z.filename) for z in self._index().values() if z}
        zips = ", ".join(sorted(names)) or "no zip"
        raise FileNotFoundError(f"{value}: not found under {self.root} nor in its zip files ({zips})")


def split_zip_names(split):
    """The image zips PAPO_eval ships for a split: <split>_images.zip, and the names the
    hub uses instead for We_Math and PAPO_MMK12."""
    # a --data file or the own validation task has no split zip of its own
    if split is None:
        return []
    return [f"{split}_images.zip"] + {"We_Math": ["We-Math_We-Math_images.zip"],
                                      "PAPO_MMK12": ["PAPO_MMK12_test_images.zip"]}.get(split, [])


def mathvista_gold(row):
    """MathVista's multiple-choice gold is the option TEXT while its query asks for the
    letter: the gold becomes the letter. Example: choices ["3", "12"], answer "12" -> "B".
    Free-form answers stay as they are."""
    choices = row.get("choices") or []
    # letters by position: choices[0] -> "A"; an answer not among the choices stays text
    if row.get("question_type") == "multi_choice" and row["answer"] in choices:
        return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[choices.index(row["answer"])]
    return row["answer"]


def sharegpt_fields(record):
    """PAPO_eval rows: messages = [user "<image>question", assistant gold]."""
    turns = record["messages"]
    # the hub's rows use role/content, older ShareGPT dumps from/value: both are read
    text = lambda t: t.get("content", t.get("value"))
    role = lambda t: t.get("role", t.get("from"))
    question = next(text(t) for t in turns if role(t) in ("user", "human"))
    # no assistant turn -> None, and load_benchmark stops naming the sample
    answer = next((text(t) for t in turns if role(t) in ("assistant", "gpt")), None)
    return question, answer


def read_rows(table, fields):
    """(question, answer, images) of every row; a row whose text is not valid UTF-8 comes
    back as (BadRowError, None, None): a bad row counted wrong, not a crash mid-eval."""
    rows = []
    for k in range(len(table)):
        # pyarrow decodes a row's strings only when the row is read: a bad byte shows here
        try:
            rows.append(fields(table[k]))
        except UnicodeDecodeError as e:
            rows.append((dataset.BadRowError(f"its text is not valid UTF-8 ({e})"), None, None))
    return rows


def load_benchmark(name, args):
    """-> (list of samples {"id", "question", "answer", "images" (raw values)}, image root)."""
    # a heavy import, needed only once a benchmark is actually loaded
    import datasets

    if name in BENCHMARKS:
        repo, split, _, _ = BENCHMARKS[name]
        if repo == PAPO_EVAL:
            root = args.data_dir
            # no --data_dir: the whole snapshot, zips included, since the images live only in them
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
            table = dataset.load_table(path, "train", ("messages", "images"))
            rows = read_rows(table, lambda r: sharegpt_fields(r) + (r["images"],))
            folder = os.path.dirname(os.path.abspath(path))
            # PAPO-Eval's rows name ./data/images/..., relative to the folder that holds data/:
            # from <root>/data/papo/<name>.json the root is two folders up
            if folder.endswith(os.path.join("data", "papo")):
                root = os.path.dirname(os.path.dirname(folder))
        else:  # AI4Math/MathVista testmini: query (with hint), answer, decoded_image
            try:
                table = datasets.load_dataset(args.data_dir or repo, split=split)
            except Exception as e:
                raise SystemExit(f"benchmark {name}: cannot load {repo} split {split} ({type(e).__name__}); "
                                 f"offline, pass --data_dir with a local copy of it") from None
            # `query` is the question with its hint, the one that asks for the option letter
            rows = read_rows(table, lambda r: (r["query"], mathvista_gold(r), [r["decoded_image"]]))
            # such a row's gold cannot become a letter (mathvista_gold): kept as text, and counted
            # here so that a reader knows how many
            odd = sum(r["question_type"] == "multi_choice" and r["answer"] not in (r["choices"] or [])
                      for r in table.select_columns(["question_type", "answer", "choices"]))
            if odd:
                print(f"warning: {name}: {odd} multiple-choice rows whose answer is not one of their "
                      f"choices keep the answer text as gold", file=sys.stderr)
            # decoded_image is a PIL image already: no path is resolved against this root
            root = "."
    else:
        # a --data file: its image paths are relative to the file's folder, as in train.py
        keys = (args.problem_key, args.answer_key, args.images_key)
        table = dataset.load_table(name, "train", keys)
        rows = read_rows(table, lambda r: tuple(r[k] for k in keys))
        root = os.path.dirname(os.path.abspath(name))
    # one sample per row, whatever happens to it: a bad row is kept, marked with its reason,
    # so that it is counted wrong in the denominator instead of silently leaving it
    samples = []
    for k, (question, answer, images) in enumerate(rows):
        if isinstance(question, dataset.BadRowError) or question is None or not str(question).strip():
            reason = str(question) if question is not None else "no question text"
            samples.append({"id": k, "question": "", "answer": str(answer or ""), "images": [],
                            "error": reason})
            continue
        # a missing gold is a broken file, not a wrong answer: nothing to grade against
        if answer is None or str(answer).strip() == "":
            raise SystemExit(f"benchmark {name}, sample {k}: no gold answer; fix the data or leave "
                             f"the sample out of the file")
        # one value or a list of them; None = a question without an image: "x.png" -> ["x.png"]
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
    # cut after the ids are given: the first N samples keep their row numbers as ids
    if args.limit:
        samples = samples[:args.limit]
    return samples, root


