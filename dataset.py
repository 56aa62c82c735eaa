"""
The data: rows in the ViRL39K schema, checked, and drawn in a shared order. Skip it on a
first read: train.py sees examples {"problem", "answer", "images"} and nothing else.

    ---- reading ----    load_table (hub id, .parquet/.json/.jsonl file or folder), Rows:
                         each row read lazily, its images opened, every defect a
                         BadRowError that names the source, the row and the fix
    ---- opening ----    open_data ('synthetic' is tiny.py's task), PromptStream: the
                         seeded order of prompts, shared by the ranks and saved for resume
    ---- bad rows ----   BadRows: skip, count, keep the first few, stop past
                         --max_bad_fraction; the start-up checks of both data sets
"""

import io
import json
import os

import torch
from PIL import Image

import tiny

class BadRowError(ValueError):
    """A dataset row that cannot be used; the message names the source, the row and a fix."""


# -----------------------------------------------------------------------------
# ---- reading ----: a table from a hub id, a file or a folder, and its rows as examples

def load_table(source, split, keys):
    """Open a dataset: a hub id, or a local .parquet/.json/.jsonl file or folder.

    keys: the column names of problem, answer and images. Returns a datasets.Dataset.
    """
    import datasets                                     # imported here: a slow import, unused by tiny runs

    # one local file: its reader from its extension, after checks that name what is wrong
    if os.path.isfile(source):
        kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(os.path.splitext(source)[1])
        if kind is None:
            raise ValueError(f"{source}: unsupported file type; use .parquet, .json or .jsonl")
        # datasets' own errors for a bad JSON line do not say which line
        if kind == "json":
            check_json_file(source)
        elif os.path.getsize(source) == 0:
            raise ValueError(f"{source} is empty")
        # a single file has no splits: datasets calls its whole content "train"
        try:
            table = datasets.load_dataset(kind, data_files=source, split="train")
        except Exception as e:
            raise ValueError(f"{source} could not be read as {kind}: {type(e).__name__} {e}") from None
    # a folder: a hub snapshot (data/<split>-*.parquet) or split files, read by datasets' layout rules
    elif os.path.isdir(source):
        found = [f for _, _, files in os.walk(source) for f in files
                 if f.endswith((".parquet", ".json", ".jsonl", ".arrow", ".csv"))]
        if not found:
            raise ValueError(f"{source}: a folder without data files (.parquet, .json, .jsonl); point at the "
                             f"dataset's folder, e.g. the one holding data/train-00000-of-00001.parquet")
        try:
            table = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise ValueError(f"{source}: could not load split {split!r} from this folder: "
                             f"{type(e).__name__} {e} (set --train_split / --val_split)") from None
    # neither: a hub id, which needs the network (or the local datasets cache)
    else:
        try:
            table = datasets.load_dataset(source, split=split)
        except Exception as e:  # offline, unknown id, missing split: say which and how
            raise ValueError(f"could not load dataset {source!r} (split {split!r}): {e}\n"
                             f"Offline? Download it elsewhere and pass a local file or folder "
                             f"instead of the hub id.") from None
    # a missing column would otherwise surface as a KeyError at the first row drawn
    missing = [k for k in keys if k not in table.column_names]
    if missing:
        raise ValueError(f"{source}: no column {missing}; its columns are {table.column_names}. "
                         f"Set --problem_key / --answer_key / --images_key to match.")
    if len(table) == 0:
        raise ValueError(f"{source} (split {split!r}) is empty")
    return table


def check_json_file(path):
    """Refuse a .json/.jsonl file that the JSON reader would reject, naming the line.

    datasets reports a bad line as a bare DatasetGenerationError, and a whitespace-only
    file as 'Instruction "train" corresponds to no data!'. Text that is not UTF-8 is left
    to the row it is in (a bad row: an error that names it, or a counted skip).
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise ValueError(f"{path} is empty")
    # bad bytes become U+FFFD here, so that only the JSON structure is judged
    text = data.decode("utf-8", errors="replace")
    # .json may be one document (a list of rows) or, like .jsonl, one row per line
    if text.lstrip().startswith("["):                    # one JSON document, a list of rows
        try:
            json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); fix the file") from None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e}); "
                                 f"fix or delete the line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: a JSON object (one row) is expected, got "
                                 f"{type(row).__name__}")


def open_image(value, base_dir, allow_outside=True):
    """A path (relative to the data file), {"bytes", "path"}, raw bytes or a PIL image.

    allow_outside=False refuses a path that is absolute or leads out of base_dir with
    "..": a data file should not read files elsewhere on the machine unless asked to.
    """
    # every form ends as an RGB image: the processor expects 3 channels (no alpha, no palette)
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    # datasets' Image feature stores {"bytes": ..., "path": ...}; the bytes win when both exist
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        # realpath resolves "..", and symlinks; the trailing separator stops /data matching /data2
        inside = os.path.realpath(path).startswith(os.path.join(os.path.realpath(base_dir), ""))
        if not allow_outside and (os.path.isabs(value) or not inside):
            raise ValueError(f"{value} lies outside the data folder {base_dir}; pass --allow_outside_paths "
                             f"to read it")
        # the file is closed at once: a long run would otherwise hold one open file per image
        with Image.open(path) as im:
            return im.convert("RGB")
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


class Rows:
    """Rows of a table as examples {"problem", "answer", "images", "id"}, converted lazily.

    Every problem of a row is checked when the row is read: a missing answer, an image
    that cannot be opened, or a count of <image> placeholders that differs from the
    number of images raises BadRowError naming the source, the row and the fix.
    """

    def __init__(self, table, source, problem_key="problem", answer_key="answer",
                 images_key="images", allow_outside=False):
        self.table, self.source, self.allow_outside = table, source, allow_outside
        self.keys = (problem_key, answer_key, images_key)
        # relative image paths are relative to the data file (or folder), never to the working folder
        self.base_dir = os.path.dirname(os.path.abspath(source)) if os.path.exists(source) else "."

    def __len__(self):
        return len(self.table)

    def __getitem__(self, index):
        problem_key, answer_key, images_key = self.keys
        # every message starts with the file and the row, so the user can find and fix it
        where = f"{self.source}, row {index}"
        try:
            record = self.table[int(index)]
        except UnicodeDecodeError as e:                   # pyarrow decodes strings when a row is read
            raise BadRowError(f"{where}: {self.fix(f'its text is not valid UTF-8 ({e})')}") from None
        # a row may hold a list of images, a single image, or none (a text-only problem)
        images = record.get(images_key) or []
        if not isinstance(images, (list, tuple)):
            images = [images]
        problem, answer = record.get(problem_key), record.get(answer_key)
        reason = self.text_problem(problem, answer, len(images))
        if reason:
            raise BadRowError(f"{where}: {reason}")
        # images are opened now, not later: a broken one is this row's error, named here
        opened = []
        for k, value in enumerate(images):
            try:
                opened.append(open_image(value, self.base_dir, self.allow_outside))
            except Exception as e:
                raise BadRowError(f"{where}: {self.fix(f'image {k} cannot be opened ({e})')}") from None
        # answers are compared as text: " 12\n" and "12" are the same answer
        return {"problem": str(problem), "answer": str(answer).strip(), "images": opened,
                "id": str(record.get("id", index))}

    @staticmethod
    def fix(reason):
        return f"{reason}; fix the row or pass --skip_bad_rows to skip and count such rows"

    def text_problem(self, problem, answer, n_images):
        """What is wrong with a row's text, or None. Example: ("<image><image>How many?",
        "2", 1) -> "2 <image> placeholders in the problem but 1 images; ..." """
        problem_key, answer_key, _ = self.keys
        if problem is None or str(problem).strip() == "":
            return self.fix(f"no problem text in column {problem_key!r}")
        if answer is None or str(answer).strip() == "":
            return self.fix(f"no answer in column {answer_key!r}")
        # a mismatch would fail deep in the forward ("Image features and image tokens do not match")
        if str(problem).count("<image>") != n_images:
            return (f"{str(problem).count('<image>')} <image> placeholders in the problem but {n_images} "
                    f"images; each image needs one placeholder where it belongs in the text")
        return None

    def scan_text(self):
        """[(row, message)] for every row whose text is unusable, without opening an image:
        the same checks as reading the row, over the whole table in a few seconds, so that
        a bad row is found at start-up rather than hours into a run. Images are still
        checked when their row is read."""
        import pyarrow as pa
        import pyarrow.compute as pc

        problem_key, answer_key, images_key = self.keys
        # whole columns as arrow arrays: no image is decoded, no row converted one by one
        arrow = self.table.with_format("arrow")[:]

        # a column as Python strings, and the rows whose bytes are not UTF-8, with their errors
        def strings(key):
            column = arrow.column(key)
            try:
                return column.to_pylist(), {}
            except UnicodeDecodeError:                    # find the rows one by one
                values, undecodable = [], {}
                for i, v in enumerate(column):
                    try:
                        values.append(v.as_py())
                    except UnicodeDecodeError as e:
                        values.append(""), undecodable.setdefault(i, e)
                return values, undecodable

        (problems, bad_p), (answers, bad_a) = strings(problem_key), strings(answer_key)
        # images per row from the column alone: a list column's lengths, else one image or none
        images = arrow.column(images_key)
        if pa.types.is_list(images.type) or pa.types.is_large_list(images.type):
            counts = pc.fill_null(pc.list_value_length(images), 0).to_pylist()
        else:
            counts = [0 if null else 1 for null in pc.is_null(images).to_pylist()]
        # the same reasons, in the same words, as reading the row would give
        bad = []
        for i, (problem, answer, n) in enumerate(zip(problems, answers, counts)):
            if i in bad_p or i in bad_a:
                reason = self.fix(f"its text is not valid UTF-8 ({bad_p.get(i) or bad_a.get(i)})")
            else:
                reason = self.text_problem(problem, answer, n)
            if reason:
                bad.append((i, f"{self.source}, row {i}: {reason}"))
        return bad


# -----------------------------------------------------------------------------
# ---- opening ----: a data set by name, and the order its prompts are drawn in

def open_data(source, split, args, seed_offset, size, copy_prior=0.0):
    """'synthetic' -> the --task of tiny.py; anything else -> Rows over a table.
    seed_offset keeps the synthetic sets apart: training is seed + 0, validation seed + 10_000."""
    # a synthetic task is made on demand: a million rows cost nothing until they are drawn
    if source == "synthetic":
        size = 1_000_000 if size < 0 else size
        task = getattr(args, "task", "count")
        if task in ("colour", "look"):
            # copy_prior: the training prompts' late-step prior (validation passes 0: independent)
            chain = tiny.LookTask if task == "look" else tiny.ColourCountingTask
            return chain(args.seed + seed_offset, size, copy_prior=copy_prior)
        return tiny.CountingTask(args.seed + seed_offset, size)
    table = load_table(source, split, (args.problem_key, args.answer_key, args.images_key))
    # --val_size: the first rows, in the file's order, so that every run validates on the same ones
    if size > 0:
        table = table.select(range(min(size, len(table))))
    return Rows(table, source, args.problem_key, args.answer_key, args.images_key,
                allow_outside=getattr(args, "allow_outside_paths", False))


class PromptStream:
    """Dataset indices in a fresh seeded permutation per epoch, shared by every rank.

    `position` counts the prompts handed out so far, by all ranks together; it is saved
    with each checkpoint so a resumed run continues with the very next prompt.
    Example: 5 rows, take(3) -> [3, 0, 4], take(3) -> [1, 2, <first of epoch 1>].
    """

    def __init__(self, size, seed, position=0):
        self.size, self.seed, self.position = size, seed, position

    def take(self, k):
        out = []
        # a take may cross an epoch's end: the rest comes from the next epoch's order
        while len(out) < k:
            epoch, offset = divmod(self.position, self.size)
            # the order is a function of (seed, epoch) alone: rebuilt, never stored, on any rank
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            chunk = order[offset:offset + k - len(out)].tolist()
            out += chunk
            self.position += len(chunk)
        return out


class Subset:
    """The rows `indices` of a dataset, read on demand (the validation rows that passed)."""

    def __init__(self, data, indices):
        # row k of the subset is row indices[k] of data: validation shards by position k
        self.data, self.indices = data, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return self.data[self.indices[k]]


# -----------------------------------------------------------------------------
# ---- bad rows ----: one ledger that skips, counts, keeps the first few and stops

class BadRows:
    """Every bad row of one data set goes through here.

    Without --skip_bad_rows the first bad row stops the run with its message (the file, the
    row, the fix). With it, a bad row is skipped and counted, its message kept among the
    first few, and the run stops, naming them, once more than --max_bad_fraction of the
    rows read were bad. Example: 3 bad of 20 read at --max_bad_fraction 0.1 -> it stops.
    """

    def __init__(self, what, args, keep=5):
        self.what, self.keep = what, keep                 # e.g. "training data rows.jsonl"
        # --skip_bad_rows and --max_bad_fraction, the two flags that decide a bad row's fate
        self.skipping, self.max_fraction = args.skip_bad_rows, args.max_bad_fraction
        self.first = []                                   # this process's first messages
        self.in_step = 0                                  # this process's bad rows since end_step
        self.total = 0                                    # every rank's, over the run so far

    def skip(self, message, error=None):
        """A bad row: raise `error` (a BadRowError of the message by default), or count it."""
        if not self.skipping:
            raise error or BadRowError(message)
        self.in_step += 1
        if len(self.first) < self.keep:
            self.first.append(message)

    def stop_past_max(self, n_bad, n_read, first):
        """Stop when more than --max_bad_fraction of the rows read were skipped as bad."""
        if n_bad > self.max_fraction * n_read:
            shown = "\n  ".join(first[:self.keep])
            # a high share of bad rows is a broken data set, not noise: stop with the first ones
            raise SystemExit(f"{self.what}: {n_bad} of {n_read} rows read are bad, more than "
                             f"--max_bad_fraction {self.max_fraction}. The first ones:\n  {shown}\n"
                             f"Fix the data (a data file moved away from its images?) or raise "
                             f"--max_bad_fraction.")

    def end_step(self, ranks, drawn, step_counts, max_prompt_len):
        """After each training step: this step's bad rows over all ranks, for the log.

        Stops when the step found no usable prompt, or when the share of bad rows among the
        `drawn` prompts so far passes --max_bad_fraction. Decided from all-reduced counts,
        so every rank stops together, naming the first bad rows of every rank.
        """
        # one all-reduce: every rank learns the step's total and reaches the same verdict
        bad = int(ranks.sum_named({"bad": self.in_step})["bad"])
        self.in_step, self.total = 0, self.total + bad
        # no usable prompt at all: the step trained on nothing, and the next would not do better
        no_prompt = step_counts["sampled_groups"] == 0
        if not no_prompt and self.total <= self.max_fraction * drawn:
            return bad
        first = ranks.gather_lists(self.first)            # a collective: every rank is here
        if no_prompt:
            long_prompts = int(step_counts["long_prompts"])
            shown = "\nThe first bad rows:\n  " + "\n  ".join(first[:self.keep]) if first else ""
            raise SystemExit(f"{self.what}: a step found no usable prompt ({bad} bad rows, {long_prompts} "
                             f"longer than --max_prompt_len {max_prompt_len}).{shown}")
        self.stop_past_max(self.total, drawn, first)


def fetch_examples(data, indices, bad_rows, first_group=0, need_image=False, stride=1):
    """The examples of rows `indices`, each bad row skipped and counted by `bad_rows` (or
    the run stopped). need_image (--fsdp): a text-only row is a bad row too, because every
    rank must run the sharded vision blocks in every forward.

    Each example's "group" id is its position in the prompt stream (first_group + k x stride,
    stride = the ranks, each of which takes every world-th prompt): unique across epochs,
    unlike the row index, so two draws of one row never merge.
    Example: indices [7, 2], first_group 40 -> [{..., "row": 7, "group": 40}, {..., "row": 2, "group": 41}]
    """
    examples = []
    # a synthetic task has no file to name (and always an image)
    source = getattr(data, "source", "the training data")
    for k, i in enumerate(indices):
        try:
            example = data[i]
        except BadRowError as e:
            # stops the run (without --skip_bad_rows) with the row's own message
            bad_rows.skip(str(e), error=e)
            continue
        # checked before encoding: a text-only row never reaches the sharded forward
        if need_image and not example["images"]:
            bad_rows.skip(f"{source}, row {i}: no image (needed under --fsdp)", error=SystemExit(
                f"{source}: row {i} has no image; under --fsdp every training prompt needs one (the "
                f"vision blocks are sharded, and every rank must run them in each forward). Drop "
                f"text-only rows, pass --skip_bad_rows to skip and count them, or train without --fsdp."))
            continue
        example["group"], example["row"] = first_group + k * stride, i
        examples.append(example)
    return examples


def checked_training(data, args, master):
    """Check the text of every training row at start-up (Rows.scan_text) and return the
    ledger of bad training rows; images are checked when a row is drawn. Without
    --skip_bad_rows the first bad row stops the run here; with it, the bad rows are
    counted against --max_bad_fraction (and skipped when drawn)."""
    bad_rows = BadRows(f"training data {args.train_data}", args)
    # a synthetic task's rows are made by code: nothing to scan
    bad = data.scan_text() if isinstance(data, Rows) else []
    if not bad:
        return bad_rows
    if not args.skip_bad_rows:
        raise BadRowError(bad[0][1])
    # bad text anywhere in the table counts against the whole table, before any is drawn
    bad_rows.stop_past_max(len(bad), len(data), [m for _, m in bad])
    if master:
        print(f"training data: {len(bad)} of {len(data)} rows have unusable text and will be skipped "
              f"(--skip_bad_rows), e.g. {bad[0][1]}")
    return bad_rows


def checked_validation(data, args, ranks):
    """Read every validation row once at start-up, with the training's skip rules.

    A bad validation row would otherwise surface at the first validation, after steps
    that were never checkpointed. Each rank reads its share; the bad rows are gathered
    so that every rank keeps the same rows (validation shards them by position).
    """
    from tqdm import tqdm
    bad = []
    # opening every image takes a while on a large set: each rank opens a 1/world share
    mine = range(ranks.rank, len(data), ranks.world)
    for i in tqdm(mine, desc="checking validation rows", disable=not ranks.master, leave=False):
        try:
            data[i]
        except BadRowError as e:
            bad.append((i, str(e)))
    # gathered before any rank raises: a rank that stopped alone would leave the others waiting
    bad = sorted(ranks.gather_lists(bad))
    if not bad:
        return data
    if not args.skip_bad_rows:
        raise BadRowError(bad[0][1])
    BadRows(f"validation set {args.val_data}", args).stop_past_max(len(bad), len(data), [m for _, m in bad])
    if ranks.master:
        print(f"validation: {len(bad)} of {len(data)} rows skipped (--skip_bad_rows), e.g. {bad[0][1]}")
    # the same rows on every rank, in the same order: validation's shards stay disjoint
    skip = {i for i, _ in bad}
    return Subset(data, [i for i in range(len(data)) if i not in skip])
