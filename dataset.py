"""Reading, validating and encoding SPIQA questions: rows, images, label map and paper vocabulary."""

import hashlib
import json
import logging
import os
import re
import string
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from utils import UsageError

logger = logging.getLogger("spiqa")

CSV_NAME = "training_data.csv"
REQUIRED_COLUMNS = ("paper_id", "question", "answer", "image")
# Accepted spellings of each column, matched case-sensitively after stripping white space.
COLUMN_ALIASES = {
    "paper_id": ("paper_id",),
    "question": ("Question", "question"),
    "answer": ("Answer", "answer"),
    "image": ("Image", "image", "image_name"),
    "caption": ("Caption", "caption"),
}
UNKNOWN_PAPER = "<unknown>"
OTHER_ANSWER = "<other>"
MAX_QUESTION_TOKENS = 128
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
PAPER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

# check_image_file enforces --max_image_pixels from the image header before decoding, so PIL's own
# warning for images above Image.MAX_IMAGE_PIXELS would only repeat it once per image.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class RowProblem:
    """One invalid row, reported with its 1-based CSV line-group number and the reason."""

    row: int
    kind: str
    detail: str


@dataclass
class ValidationReport:
    """The rows kept and every problem found, grouped by kind."""

    rows: pd.DataFrame
    problems: list = field(default_factory=list)

    def counts(self):
        return Counter(problem.kind for problem in self.problems)


# Problem kinds that skip the row unless --strict is given. Anything else stops the run.
SKIPPABLE_PROBLEMS = {
    "empty question",
    "empty answer",
    "empty paper id",
    "invalid paper id",
    "empty image name",
    "missing paper folder",
    "missing image",
    "image path outside the data directory",
    "not an image",
    "corrupt image",
    "image too large",
}


def column_renames(columns):
    """Return {column as written: canonical name} for the accepted spellings among columns."""
    renames = {}
    for canonical, aliases in COLUMN_ALIASES.items():
        for column in columns:
            if str(column).strip() in aliases and canonical not in renames.values():
                renames[column] = canonical
    return renames


def normalize_columns(frame, source, required=REQUIRED_COLUMNS):
    """Rename accepted column spellings to paper_id, question, answer, image (and caption).

    Raises UsageError naming the columns found when a required one is missing.
    """
    found = ", ".join(str(column).strip() for column in frame.columns) or "none"
    frame = frame.rename(columns=column_renames(frame.columns))
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise UsageError(
            f"{source} is missing the column(s) {', '.join(missing)}; found: {found}. "
            "Expected paper_id,Question,Answer,Image (lower-case question, answer, image or image_name also work)"
        )
    return frame


def read_csv_file(csv_path, required=REQUIRED_COLUMNS):
    """Read a training CSV with pandas, keeping quoted commas and newlines inside answers.

    Every cell is read as a string and empty cells become empty strings. Raises UsageError for a
    missing, empty, or undecodable file.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UsageError(f"{csv_path} not found; pass --data_dir with a folder that contains {CSV_NAME}")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise UsageError(f"{csv_path} is empty; it needs a header row paper_id,Question,Answer,Image and data rows") from None
    except UnicodeDecodeError as error:
        raise UsageError(
            f"{csv_path} is not valid UTF-8 (byte {error.start}); re-save it as UTF-8, for example with "
            f"iconv -f latin1 -t utf-8"
        ) from None
    except pd.errors.ParserError as error:
        raise UsageError(f"{csv_path} could not be parsed as CSV: {error}") from None

    frame = normalize_columns(frame, csv_path, required)
    if len(frame) == 0:
        raise UsageError(f"{csv_path} has a header but no data rows")
    for column in frame.columns:
        frame[column] = frame[column].astype(str)
    return frame


def resolve_image_path(data_dir, paper_id, image_name):
    """Return <data_dir>/<paper_id>/<image_name>, or None if that path leaves data_dir."""
    if os.path.isabs(image_name) or os.path.isabs(paper_id):
        return None
    root = Path(data_dir).resolve()
    path = (root / paper_id / image_name).resolve()
    if root not in path.parents:
        return None
    return path


def check_image_file(path, max_pixels):
    """Return None if path contains a readable image within max_pixels, else (kind, detail)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                return "image too large", f"{width}x{height} pixels exceeds the limit of {max_pixels} (--max_image_pixels)"
            image_format = image.format
            image.verify()
        # verify() checks PNG chunk checksums but reads no JPEG data, so other formats are decoded in full.
        # NOTE: a PNG with valid checksums but less image data than its size needs passes this check.
        if image_format != "PNG":
            with Image.open(path) as image:
                image.load()
    except Image.DecompressionBombError as error:
        return "image too large", str(error)
    except Image.UnidentifiedImageError:
        return "not an image", "PIL cannot identify the file as an image"
    except (OSError, SyntaxError, ValueError) as error:
        return "corrupt image", f"{type(error).__name__}: {error}"
    return None


def check_row_fields(row_number, row):
    """Return the problems of one row's text fields: empty cells and an invalid paper id."""
    paper_id = row.paper_id.strip()
    image_name = row.image.strip()
    row_problems = []
    if not row.question.strip():
        row_problems.append(RowProblem(row_number, "empty question", "the question cell is empty"))
    if not row.answer.strip():
        row_problems.append(RowProblem(row_number, "empty answer", "the answer cell is empty"))
    if not paper_id:
        row_problems.append(RowProblem(row_number, "empty paper id", "the paper_id cell is empty"))
    elif not PAPER_ID_PATTERN.match(paper_id) or ".." in paper_id:
        row_problems.append(RowProblem(row_number, "invalid paper id", f"{paper_id!r} is not a paper id"))
    if not image_name:
        row_problems.append(RowProblem(row_number, "empty image name", "the image cell is empty"))
    return row_problems


def locate_image(row_number, images_dir, paper_id, image_name):
    """Return (resolved image path or None, problems) for one row whose fields are valid."""
    row_problems = []
    path = resolve_image_path(images_dir, paper_id, image_name)
    if path is None:
        row_problems.append(
            RowProblem(row_number, "image path outside the data directory", f"{paper_id}/{image_name}")
        )
    elif not (images_dir / paper_id).is_dir():
        row_problems.append(RowProblem(row_number, "missing paper folder", str(images_dir / paper_id)))
    elif not path.is_file():
        row_problems.append(RowProblem(row_number, "missing image", str(path)))
    return path, row_problems


def verify_images(to_check, keep, problems, max_pixels, workers):
    """Open every (position, path) of to_check once, adding a problem and clearing keep for bad images."""
    if not to_check:
        return
    # PIL releases the GIL while decoding, so threads overlap the file reads and CRC checks.
    unique_paths = sorted({path for _, path in to_check})
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(unique_paths, pool.map(lambda path: check_image_file(path, max_pixels), unique_paths)))
    for position, path in to_check:
        result = results[path]
        if result is not None:
            problems.append(RowProblem(position + 1, result[0], f"{path}: {result[1]}"))
            keep[position] = False


def finish_report(frame, keep, image_paths, problems):
    rows = frame.assign(image_path=image_paths, csv_row=np.arange(1, len(frame) + 1))[keep].reset_index(drop=True)
    rows["paper_id"] = rows["paper_id"].str.strip()
    rows["image"] = rows["image"].str.strip()
    problems.sort(key=lambda problem: problem.row)
    return ValidationReport(rows=rows, problems=problems)


def validate_rows(frame, images_dir, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, check_images=True, workers=8):
    """Check every row's fields and image and return the valid rows with a list of problems.

    Adds an image_path column with the resolved image path and a csv_row column with the row's
    number. Row numbers count data rows from 1, in file order, in both places.
    """
    problems = []
    keep = []
    image_paths = []
    images_dir = Path(images_dir)

    to_check = []
    for position, row in enumerate(frame.itertuples(index=False)):
        row_number = position + 1
        row_problems = check_row_fields(row_number, row)
        path = None
        if not row_problems:
            path, row_problems = locate_image(row_number, images_dir, row.paper_id.strip(), row.image.strip())

        problems.extend(row_problems)
        keep.append(not row_problems)
        image_paths.append(str(path) if path is not None else "")
        if not row_problems and check_images:
            to_check.append((position, path))

    verify_images(to_check, keep, problems, max_pixels, workers)
    return finish_report(frame, keep, image_paths, problems)


def report_problems(report, source, strict):
    """Log every problem, then raise UsageError if any must stop the run; returns the rows kept.

    Problems outside SKIPPABLE_PROBLEMS always stop; with strict, every problem stops.
    """
    if not report.problems:
        return report.rows

    for problem in report.problems[:50]:
        logger.warning("%s row %d: %s: %s", source, problem.row, problem.kind, problem.detail)
    if len(report.problems) > 50:
        logger.warning("%s: %d more problems not shown", source, len(report.problems) - 50)

    counts = report.counts()
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items()))
    fatal = [kind for kind in counts if strict or kind not in SKIPPABLE_PROBLEMS]
    if fatal:
        first = [problem for problem in report.problems if problem.kind in fatal][:5]
        lines = "\n".join(f"  row {problem.row}: {problem.kind}: {problem.detail}" for problem in first)
        fix = "fix these rows" + ("" if not strict else " or drop --strict to skip them")
        raise UsageError(f"{source} has invalid rows ({summary}):\n{lines}\n{fix}")

    skipped = len({problem.row for problem in report.problems})
    logger.warning("%s: skipped %d of %d rows (%s)", source, skipped, len(report.rows) + skipped, summary)
    return report.rows


def load_rows(data_dir, strict=False, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, csv_path=None):
    """Read and validate <data_dir>/training_data.csv and return the valid rows as a DataFrame."""
    data_dir = Path(data_dir)
    if csv_path is None:
        if not data_dir.is_dir():
            raise UsageError(f"--data_dir {data_dir} is not a folder; it must hold {CSV_NAME} and one folder per paper")
        csv_path = data_dir / CSV_NAME
    frame = read_csv_file(csv_path)
    report = validate_rows(frame, data_dir, max_pixels=max_pixels)
    rows = report_problems(report, str(csv_path), strict)
    if len(rows) == 0:
        raise UsageError(f"{csv_path} has no valid rows: all {len(frame)} were skipped; fix the rows listed above")
    return rows


def read_questions_for_tokenizer(data_dir):
    """Return every question (and caption, where present) of a data folder, for vocabulary training."""
    frame = read_csv_file(Path(data_dir) / CSV_NAME)
    texts = list(frame["question"])
    if "caption" in frame.columns:
        texts += [caption for caption in frame["caption"] if caption]
    return texts


# ---------------------------------------------------------------------------------------------
# Answers, papers and splits


def normalize_answer(text):
    """Fold case, collapse white space and strip trailing punctuation, so trivial variants match."""
    text = " ".join(text.split()).lower()
    return text.rstrip(string.punctuation + " ")


def build_label_map(answers, min_count=1, max_classes=None, rare_answers="drop"):
    """Map answer text to class index, most frequent first and then alphabetically (a stable order).

    Answers seen fewer than min_count times, or beyond the max_classes most frequent, are out of the
    vocabulary; with rare_answers="other" they share one OTHER_ANSWER class, added last.
    """
    counts = Counter(answers)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = [answer for answer, count in ranked if count >= min_count]
    if max_classes is not None:
        kept = kept[:max_classes]

    label_map = {answer: index for index, answer in enumerate(kept)}
    if rare_answers == "other" and len(kept) < len(counts):
        label_map[OTHER_ANSWER] = len(label_map)
    return label_map


def encode_labels(answers, label_map):
    """Return one class index per answer; answers outside the label map get -1 (or OTHER_ANSWER's index)."""
    fallback = label_map.get(OTHER_ANSWER, -1)
    return [label_map.get(answer, fallback) for answer in answers]


def count_out_of_vocabulary(answers, label_map):
    """Return (questions, distinct answers) among answers that are not a class of label_map.

    They count as outside whether they are dropped or mapped to OTHER_ANSWER.
    """
    outside = Counter(answer for answer in answers if answer not in label_map)
    return sum(outside.values()), len(outside)


def build_paper_vocab(paper_ids):
    """Map paper id to embedding index, sorted; index 0 is reserved for papers not seen in training."""
    vocab = {UNKNOWN_PAPER: 0}
    for paper_id in sorted(set(paper_ids)):
        vocab[paper_id] = len(vocab)
    return vocab


def paper_index(paper_vocab, paper_id):
    return paper_vocab.get(paper_id, 0)


def split_rows(rows, val_fraction, seed, split_by="question"):
    """Return (train_positions, val_positions), sorted, chosen reproducibly from seed.

    The split depends only on the rows, val_fraction and seed, never on the number of processes.
    With split_by="paper" no paper has questions on both sides.
    """
    positions = np.arange(len(rows))
    if val_fraction == 0:
        return positions, positions[:0]

    generator = np.random.default_rng(seed)
    if split_by == "paper":
        papers = np.array(sorted(set(rows["paper_id"])))
        generator.shuffle(papers)
        val_paper_count = max(1, round(len(papers) * val_fraction))
        if val_paper_count >= len(papers):
            raise UsageError(f"--val_fraction {val_fraction} leaves no training paper among {len(papers)} papers")
        val_papers = set(papers[:val_paper_count])
        is_val = rows["paper_id"].isin(val_papers).to_numpy()
    else:
        shuffled = generator.permutation(len(rows))
        val_count = max(1, round(len(rows) * val_fraction))
        if val_count >= len(rows):
            raise UsageError(f"--val_fraction {val_fraction} leaves no training row among {len(rows)} rows")
        is_val = np.zeros(len(rows), dtype=bool)
        is_val[shuffled[:val_count]] = True
    return positions[~is_val], positions[is_val]


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class ImageSettings:
    """Preprocessing values read from a checkpoint's image-processor config."""

    height: int
    width: int
    resample: int
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple
    image_std: tuple

    @classmethod
    def from_processor(cls, processor):
        size = processor.size
        if "height" in size:
            height, width = size["height"], size["width"]
        elif "shortest_edge" in size:
            height = width = size["shortest_edge"]
        else:
            raise UsageError(f"unsupported image processor size {size}; expected height and width")
        return cls(
            height=int(height),
            width=int(width),
            resample=int(processor.resample),
            do_resize=bool(processor.do_resize),
            do_rescale=bool(processor.do_rescale),
            rescale_factor=float(processor.rescale_factor),
            do_normalize=bool(processor.do_normalize),
            image_mean=tuple(float(value) for value in processor.image_mean),
            image_std=tuple(float(value) for value in processor.image_std),
        )

    @classmethod
    def from_pretrained(cls, name_or_path):
        from transformers import AutoImageProcessor

        return cls.from_processor(AutoImageProcessor.from_pretrained(name_or_path, use_fast=False))

    def to_dict(self):
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["image_mean"] = tuple(data["image_mean"])
        data["image_std"] = tuple(data["image_std"])
        return cls(**data)


def to_rgb(image):
    """Convert any PIL image a paper figure comes in to 8-bit RGB, honouring EXIF rotation.

    Transparency is composited on white, as figures are drawn on white pages; 16-bit and float
    grayscale are scaled to 0-255 by their value range.
    """
    image = ImageOps.exif_transpose(image)

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            array = array / 65535.0 * 255.0
        elif image.mode == "I" and array.max(initial=0) > 255:
            array = array / 65535.0 * 255.0
        elif image.mode == "F" and array.max(initial=0) <= 1.0:
            array = array * 255.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")

    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_image_uint8(path, settings):
    """Decode an image file and return it resized as a uint8 tensor of shape [3, height, width].

    Rescaling and normalisation are left to the model (SpiqaClassifier.normalize_pixels), so that
    cached images stay small and batches travel to the GPU as uint8.
    """
    with Image.open(path) as image:
        image.load()
        image = to_rgb(image)
    if settings.do_resize:
        image = image.resize((settings.width, settings.height), resample=Image.Resampling(settings.resample))
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageCache:
    """Preprocessed uint8 images on disk, one .npy file per image.

    A key covers the image's resolved path, size, modification time and the image settings, so an
    edited image or a new image processor misses the cache instead of returning stale pixels.
    """

    def __init__(self, cache_dir, settings):
        self.cache_dir = Path(cache_dir)
        self.settings = settings
        self.settings_key = json.dumps(settings.to_dict(), sort_keys=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def key(self, path):
        stat = os.stat(path)
        text = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{self.settings_key}"
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def load(self, path):
        cached = self.cache_dir / f"{self.key(path)}.npy"
        try:
            return torch.from_numpy(np.load(cached))
        except (FileNotFoundError, ValueError, OSError):
            pass

        pixels = load_image_uint8(path, self.settings)
        temporary = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            np.save(handle, pixels.numpy())
        os.replace(temporary, cached)
        return pixels


# ---------------------------------------------------------------------------------------------
# Questions and batches


def tokenize_questions(tokenizer, questions, captions=None, max_length=MAX_QUESTION_TOKENS):
    """Tokenize each question once, unpadded, truncated to max_length tokens.

    With captions, each question and its caption form a sentence pair; truncation shortens the
    caption first (both, when the question alone fills the budget), and an empty caption falls
    back to the question alone. The fast tokenizer encodes each group in one batched call. Returns
    a list of (input_ids, token_type_ids) pairs of Python lists, in input order.
    """
    questions = list(questions)
    captions = list(captions) if captions is not None else [""] * len(questions)
    encoded = [None] * len(questions)

    def store(positions, result):
        for offset, position in enumerate(positions):
            input_ids = result["input_ids"][offset]
            token_types = result["token_type_ids"][offset] if "token_type_ids" in result else [0] * len(input_ids)
            encoded[position] = (input_ids, token_types)

    alone = [position for position, caption in enumerate(captions) if not caption]
    if alone:
        store(alone, tokenizer([questions[p] for p in alone], truncation=True, max_length=max_length))

    paired = [position for position, caption in enumerate(captions) if caption]
    if paired:
        # Fast tokenizers raise instead of truncating "only_second" when the question alone fills the budget.
        lengths = tokenizer([questions[p] for p in paired], add_special_tokens=False)["input_ids"]
        room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
        for truncation, group in (
            ("only_second", [p for p, ids in zip(paired, lengths) if len(ids) < room]),
            ("longest_first", [p for p, ids in zip(paired, lengths) if len(ids) >= room]),
        ):
            if group:
                result = tokenizer(
                    [questions[p] for p in group], [captions[p] for p in group],
                    truncation=truncation, max_length=max_length,
                )
                store(group, result)
    return encoded


class EncodedQuestions:
    """Tokenized questions packed into flat int32 arrays, indexed like a list of (input_ids, token_type_ids).

    Python lists of token ids cost about 36 bytes a token; packing costs 5, which matters for the
    270,000 questions and captions of a full SPIQA split. Items are NumPy arrays.
    """

    def __init__(self, tokenizer, questions, captions=None, max_length=MAX_QUESTION_TOKENS, chunk_size=20_000):
        questions = list(questions)
        captions = list(captions) if captions is not None else None
        id_chunks, type_chunks, lengths = [], [], []
        for start in range(0, len(questions), chunk_size):
            chunk_captions = captions[start : start + chunk_size] if captions is not None else None
            encoded = tokenize_questions(tokenizer, questions[start : start + chunk_size], chunk_captions, max_length)
            for input_ids, token_type_ids in encoded:
                id_chunks.append(np.asarray(input_ids, dtype=np.int32))
                type_chunks.append(np.asarray(token_type_ids, dtype=np.int8))
                lengths.append(len(input_ids))

        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.input_ids = np.concatenate(id_chunks) if id_chunks else np.zeros(0, dtype=np.int32)
        self.token_type_ids = np.concatenate(type_chunks) if type_chunks else np.zeros(0, dtype=np.int8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.input_ids[start:end], self.token_type_ids[start:end]


class QuestionImageDataset(Dataset):
    """Encoded questions with their figure, paper index and class index.

    Each item is a dict with pixel_values (uint8, [3, H, W]), input_ids and token_type_ids (int64,
    unpadded), paper_id (int64 index), label (int64, -1 when the answer is not a class) and row.
    """

    def __init__(self, image_paths, encoded_questions, paper_indices, labels, settings, image_cache=None):
        self.image_paths = list(image_paths)
        self.encoded_questions = encoded_questions
        self.paper_indices = list(paper_indices)
        self.labels = list(labels)
        self.settings = settings
        self.image_cache = image_cache

    def __len__(self):
        return len(self.image_paths)

    def load_image(self, index):
        if self.image_cache is not None:
            return self.image_cache.load(self.image_paths[index])
        return load_image_uint8(self.image_paths[index], self.settings)

    def __getitem__(self, index):
        input_ids, token_type_ids = self.encoded_questions[index]
        return {
            "pixel_values": self.load_image(index),
            "input_ids": torch.as_tensor(input_ids).long(),
            "token_type_ids": torch.as_tensor(token_type_ids).long(),
            "paper_ids": torch.tensor(self.paper_indices[index], dtype=torch.long),
            "labels": torch.tensor(self.labels[index], dtype=torch.long),
            "rows": torch.tensor(index, dtype=torch.long),
        }


class BatchCollator:
    """Stack items into a batch, padding questions to the longest one (or to pad_to, if given)."""

    def __init__(self, pad_token_id, pad_to=None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, items):
        length = self.pad_to or max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(items), length), dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for position, item in enumerate(items):
            count = len(item["input_ids"])
            input_ids[position, :count] = item["input_ids"]
            token_type_ids[position, :count] = item["token_type_ids"]
            attention_mask[position, :count] = 1

        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "paper_ids": torch.stack([item["paper_ids"] for item in items]),
            "labels": torch.stack([item["labels"] for item in items]),
            "rows": torch.stack([item["rows"] for item in items]),
        }



# ---------------------------------------------------------------------------------------------
# The SPIQA release's JSON splits

RELEASE_COLUMNS = ("paper_id", "question", "answer", "image", "caption")
IMAGE_CHECKS = ("full", "exists")


def describe_release_layout(paper):
    """Name the SPIQA split whose layout one paper object has: "train", "test-B", "test-C" or None.

    The train, validation and test-A splits store "all_figures" and a "qa" list. test-B stores
    "all_figures_tables" and parallel "question" and "composition" lists, and test-C stores
    "figures_and_tables" and parallel "question" and "answer" lists, as google/spiqa's
    evaluation scripts read them.
    """
    if not isinstance(paper, dict):
        return None
    if isinstance(paper.get("qa"), list) and isinstance(paper.get("all_figures"), dict):
        return "train"
    if "all_figures_tables" in paper or "composition" in paper:
        return "test-B"
    if "figures_and_tables" in paper:
        return "test-C"
    return None


def check_release_layout(release, source):
    """Raise UsageError unless every paper of a loaded JSON split has the train/val/test-A layout."""
    if not isinstance(release, dict) or not release:
        raise UsageError(
            f"{source} is not a SPIQA split: expected a JSON object that maps paper ids to papers, "
            f"found {type(release).__name__}{' (empty)' if not release else ''}"
        )
    for paper_id, paper in release.items():
        layout = describe_release_layout(paper)
        if layout == "train":
            continue
        if layout in ("test-B", "test-C"):
            raise UsageError(
                f"{source} has the SPIQA {layout} layout (paper {paper_id}), which this program cannot read; "
                "use SPIQA_train.json, SPIQA_val.json or SPIQA_testA.json, whose papers hold all_figures and qa"
            )
        keys = ", ".join(sorted(paper)) if isinstance(paper, dict) else type(paper).__name__
        raise UsageError(
            f"{source}: paper {paper_id} is not in the SPIQA train/val/test-A layout (found {keys}); "
            "each paper needs an all_figures object and a qa list"
        )


def text_field(value):
    """Return a JSON value as text: None becomes "", numbers and booleans their str()."""
    return "" if value is None else str(value)


def read_release_json(json_file):
    """Read a SPIQA train, val or test-A JSON split into one row per question.

    Returns a DataFrame with the string columns of RELEASE_COLUMNS, in file order. The caption is
    the referenced figure's caption from all_figures, or "" where the figure is not listed there.
    Raises UsageError for a missing or unreadable file and for any other layout, test-B and
    test-C included.
    """
    json_file = Path(json_file)
    if not json_file.is_file():
        raise UsageError(f"{json_file} not found; pass a SPIQA split such as train_val/SPIQA_train.json")
    try:
        with open(json_file, encoding="utf-8") as handle:
            release = json.load(handle)
    except UnicodeDecodeError as error:
        raise UsageError(f"{json_file} is not valid UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{json_file} is not valid JSON ({error}); download it again") from None
    check_release_layout(release, json_file)

    columns = {name: [] for name in RELEASE_COLUMNS}
    uncaptioned = 0
    for paper_id, paper in release.items():
        figures = paper["all_figures"]
        for item in paper["qa"]:
            if not isinstance(item, dict):
                raise UsageError(f"{json_file}: paper {paper_id} has a qa entry that is not an object: {item!r:.80}")
            reference = text_field(item.get("reference"))
            figure = figures.get(reference)
            caption = text_field(figure.get("caption")) if isinstance(figure, dict) else ""
            uncaptioned += not caption
            columns["paper_id"].append(text_field(paper_id))
            columns["question"].append(text_field(item.get("question")))
            columns["answer"].append(text_field(item.get("answer")))
            columns["image"].append(reference)
            columns["caption"].append(caption)
    # Free the parsed JSON before the DataFrame copies the columns, to keep the peak lower.
    del release

    frame = pd.DataFrame(columns)
    if len(frame) == 0:
        raise UsageError(f"{json_file} has papers but no questions")
    if uncaptioned:
        logger.info("%s: %d of %d questions have no caption for their figure", json_file, uncaptioned, len(frame))
    return frame


def read_question_file(path):
    """Read our training CSV or a SPIQA JSON split, chosen by the file's suffix (.json or else CSV)."""
    if Path(path).suffix.lower() == ".json":
        return read_release_json(path)
    return read_csv_file(path)


def list_paper_folder(root, paper_id):
    """Return (resolved folder, set of regular file names in it) for one paper, or None.

    None means the folder is missing, unreadable or resolves outside root. Symbolic links are
    left out of the set, so rows that name them take the full check of locate_image.
    """
    try:
        folder = (root / paper_id).resolve(strict=True)
    except OSError:
        return None
    if root not in folder.parents:
        return None
    try:
        with os.scandir(folder) as entries:
            names = {entry.name for entry in entries if entry.is_file(follow_symlinks=False)}
    except OSError:
        return None
    return str(folder), names


def validate_rows_by_folder(frame, images_dir, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, check_images=True, workers=8):
    """Check rows like validate_rows, listing each paper folder once instead of resolving every path.

    Returns the same ValidationReport as validate_rows. A row whose image is a regular file in
    its paper's folder is accepted from the listing; every other row takes validate_rows' checks.
    On a synthetic split of SPIQA_train.json's size this took 4 s instead of 25 s (see
    benchmarks/README.md).
    """
    problems = []
    keep = []
    image_paths = []
    images_dir = Path(images_dir)
    root = images_dir.resolve()
    folders = {}

    to_check = []
    for position, row in enumerate(frame.itertuples(index=False)):
        row_number = position + 1
        row_problems = check_row_fields(row_number, row)
        path = ""
        if not row_problems:
            paper_id = row.paper_id.strip()
            image_name = row.image.strip()
            if paper_id not in folders:
                folders[paper_id] = list_paper_folder(root, paper_id)
            folder = folders[paper_id]
            if folder is not None and image_name in folder[1]:
                path = os.path.join(folder[0], image_name)
            else:
                located, row_problems = locate_image(row_number, images_dir, paper_id, image_name)
                path = str(located) if located is not None else ""

        problems.extend(row_problems)
        keep.append(not row_problems)
        image_paths.append(path)
        if not row_problems and check_images:
            to_check.append((position, path))

    verify_images(to_check, keep, problems, max_pixels, workers)
    return finish_report(frame, keep, image_paths, problems)


def load_question_file(path, images_dir, strict=False, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, image_check="full"):
    """Read and validate a CSV or SPIQA JSON file whose images lie in <images_dir>/<paper_id>/.

    With image_check="full" every image is opened and verified; with "exists" only its presence
    is checked, so a corrupt file fails later, when the data loader decodes it.
    """
    if image_check not in IMAGE_CHECKS:
        raise UsageError(f"image check {image_check!r} is not one of {', '.join(IMAGE_CHECKS)}")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise UsageError(f"image folder {images_dir} not found; pass the folder that contains one folder per paper")

    frame = read_question_file(path)
    report = validate_rows_by_folder(frame, images_dir, max_pixels=max_pixels, check_images=image_check == "full")
    return report_problems(report, str(path), strict)


def convert_spiqa_json_to_csv(json_file, output_csv):
    """Write a SPIQA JSON split as our training CSV with an extra Caption column.

    The columns are paper_id,Question,Answer,Image,Caption. Returns the number of questions
    written. Images are not checked, because the CSV names them relative to a folder that the
    caller chooses later.
    """
    from utils import atomic_path

    frame = read_release_json(json_file)
    output = frame.rename(columns={"question": "Question", "answer": "Answer", "image": "Image", "caption": "Caption"})
    with atomic_path(output_csv) as temporary:
        output.to_csv(temporary, index=False, encoding="utf-8")
    return len(output)
