"""Train the SPIQA classifier on one CPU or GPU, or on several GPUs and nodes through torchrun.

    python train.py --mixed_precision
    torchrun --nproc_per_node=4 train.py --multi_gpu --mixed_precision
"""

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import dataset as data
import utils
from model import FUSION_HIDDEN_DIM, PAPER_EMBEDDING_DIM, build_model
from utils import UsageError

logger = logging.getLogger("spiqa")

# Validation measures that improve upwards; every other selectable measure improves downwards.
HIGHER_IS_BETTER = {"val_accuracy", "val_top5_accuracy", "val_rouge_l", "val_bleu", "val_exact_match"}
SELECTABLE_METRICS = sorted(HIGHER_IS_BETTER | {"val_loss", "train_loss"})
LAST_WEIGHTS_NAME = "last.safetensors"
PREVIOUS_WEIGHTS_NAME = "previous.safetensors"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train the SPIQA figure and table question classifier.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data_dir", default="OverheatData", help="folder with training_data.csv and one image folder per paper")
    parser.add_argument("--train_file", default=None, help="training questions instead of --data_dir: a SPIQA release JSON split (for example train_val/SPIQA_train.json) or a CSV in the training_data.csv format")
    parser.add_argument("--train_images_dir", default=None, help="folder with one image folder per paper for --train_file (for example train_val/SPIQA_train_val_Images)")
    parser.add_argument("--val_file", default=None, help="validation questions (JSON split or CSV); replaces the --val_fraction split of the training file")
    parser.add_argument("--val_images_dir", default=None, help="image folder for --val_file (default: --train_images_dir)")
    parser.add_argument("--image_check", choices=data.IMAGE_CHECKS, default=None, help="full: open and verify every image at start-up; exists: only check that each file exists, so a corrupt image fails when loaded (default: full with --data_dir, exists with --train_file)")
    parser.add_argument("--use_caption", action="store_true", help="encode the question and its figure caption as a sentence pair (question first, caption truncated first); questions without a caption are encoded alone")
    parser.add_argument("--output_dir", default=None, help="run directory for weights, label map and metrics (default: runs/spiqa, or the --resume directory)")
    parser.add_argument("--vision_model", default="google/vit-base-patch16-224", help="ViT hub name or local directory")
    parser.add_argument("--text_model", default="bert-base-uncased", help="BERT hub name or local directory")
    parser.add_argument("--batch_size", type=int, default=16, help="questions per GPU (or process) per step")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    parser.add_argument("--learning_rate", type=float, default=2e-5, help="peak AdamW learning rate")
    parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay on weight matrices")
    parser.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of steps with linear warm-up; the rate then decays linearly to 0")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this value; 0 turns clipping off")
    parser.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout in the fusion head")
    parser.add_argument("--paper_dropout", type=float, default=0.1, help="probability of training a question as from an unknown paper, so that unseen papers get a learned embedding")
    parser.add_argument("--mixed_precision", action="store_true", help="autocast with --amp_dtype on CUDA (with a gradient scaler for float16); bfloat16 autocast on a CPU")
    parser.add_argument("--amp_dtype", choices=("float16", "bfloat16"), default="float16", help="autocast dtype on CUDA")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="allow TF32 matmuls on Ampere and newer GPUs")
    parser.add_argument("--fused_adamw", action=argparse.BooleanOptionalAction, default=True, help="use the fused AdamW kernel on CUDA")
    parser.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    parser.add_argument("--attn_implementation", choices=("sdpa", "eager"), default="sdpa", help="attention kernel of both encoders")
    parser.add_argument("--freeze_encoders", action="store_true", help="train only the paper embedding and fusion head, on encoder features computed once")
    parser.add_argument("--num_workers", type=int, default=4, help="data loader worker processes per GPU (or process)")
    parser.add_argument("--cache_dir", default=None, help="folder for preprocessed images (default: ~/.cache/spiqa/images)")
    parser.add_argument("--no_image_cache", action="store_true", help="decode every image from its file at every step")
    parser.add_argument("--empty_cache_interval", type=int, default=100, help="call torch.cuda.empty_cache() every this many steps; 0 never")
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device index of a single-process run (default: GPU 0 if present, else the CPU)")
    parser.add_argument("--multi_gpu", action="store_true", help="use DistributedDataParallel across the processes torchrun starts")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by torch.distributed.launch; torchrun uses LOCAL_RANK")
    parser.add_argument("--dist_timeout_minutes", type=float, default=30.0, help="a collective that waits longer fails, so ranks exit when one dies")
    parser.add_argument("--seed", type=int, default=42, help="seed for the split, initialisation, shuffling and dropout")
    parser.add_argument("--val_fraction", type=float, default=0.2, help="fraction of questions held out for validation; 0 trains on all")
    parser.add_argument("--split_by", choices=("question", "paper"), default="question", help="hold out random questions, or whole papers")
    parser.add_argument("--select_metric", choices=SELECTABLE_METRICS, default="val_loss", help="validation measure that picks the best checkpoint")
    parser.add_argument("--max_samples", type=int, default=None, help="use only the first N valid rows, for quick runs")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--min_answer_count", type=int, default=1, help="answers seen fewer times in training get no class")
    parser.add_argument("--max_classes", type=int, default=None, help="keep only the most frequent answers as classes")
    parser.add_argument("--normalize_answers", action="store_true", help="merge answers that differ only in case, white space or trailing punctuation")
    parser.add_argument("--rare_answers", choices=("drop", "other"), default="drop", help="drop training questions whose answer has no class, or map them to one <other> class")
    parser.add_argument("--max_image_pixels", type=int, default=data.DEFAULT_MAX_IMAGE_PIXELS, help="reject images with more pixels (decompression bombs)")
    parser.add_argument("--strict", action="store_true", help="stop on any invalid row instead of skipping it")
    parser.add_argument("--resume", default=None, help="run directory to continue from its last checkpoint, with the options it was started with (--epochs may grow)")
    parser.add_argument("--log_interval", type=int, default=10, help="steps between progress bar updates of the loss")
    args = parser.parse_args(argv)
    if args.resume is not None:
        # A second parse without defaults returns only the options set on the command line.
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        args = merge_resumed_args(args, command_line_options=set(vars(parser.parse_args(argv))))
    if args.output_dir is None:
        args.output_dir = "runs/spiqa"
    check_args(args)
    return args


# Options that a resumed run may change; every other option is read back from the run directory.
RESUME_OVERRIDABLE = {"epochs", "resume", "output_dir", "num_workers", "cache_dir", "max_steps", "dist_timeout_minutes",
                      "local_rank", "multi_gpu", "log_interval", "compile", "empty_cache_interval", "gpu"}
# Options that describe this launch only, so a resumed run never reads them back.
LAUNCH_ONLY = {"resume", "output_dir", "local_rank"}


def merge_resumed_args(args, command_line_options=None):
    """Return args with the resumed run's saved options.

    An option in RESUME_OVERRIDABLE keeps its command-line value when it is in command_line_options
    (all of them when that is None). The others, and those left out, take the saved value.
    """
    config_path = Path(args.resume, utils.RUN_CONFIG_NAME)
    if not config_path.is_file():
        raise UsageError(f"--resume {args.resume} contains no {utils.RUN_CONFIG_NAME}; pass a run directory that train.py wrote")
    saved = utils.read_json(config_path)["args"]
    merged = vars(args).copy()
    for name, value in saved.items():
        if name not in merged or name in LAUNCH_ONLY:
            continue
        if name not in RESUME_OVERRIDABLE or (command_line_options is not None and name not in command_line_options):
            merged[name] = value
    if merged["output_dir"] is None:
        merged["output_dir"] = args.resume
    return argparse.Namespace(**merged)


def check_args(args):
    """Raise UsageError naming the first option outside its accepted range."""
    positive = ("batch_size", "epochs", "grad_accum_steps", "log_interval")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise UsageError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    fractions = {"val_fraction": (0.0, 1.0), "dropout": (0.0, 1.0), "paper_dropout": (0.0, 1.0), "warmup_ratio": (0.0, 1.0)}
    for name, (low, high) in fractions.items():
        value = getattr(args, name)
        if not low <= value < high:
            raise UsageError(f"--{name} must be in [{low}, {high}), got {value}")
    non_negative = ("num_workers", "weight_decay", "max_grad_norm", "empty_cache_interval")
    for name in non_negative:
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} must be a number of 0 or more, got {value}")
    optional_positive = ("max_samples", "max_steps", "max_classes", "min_answer_count", "max_image_pixels")
    for name in optional_positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if not (math.isfinite(args.dist_timeout_minutes) and args.dist_timeout_minutes > 0):
        raise UsageError(f"--dist_timeout_minutes must be a positive number, got {args.dist_timeout_minutes}")
    # PIL raises DecompressionBombError above twice Image.MAX_IMAGE_PIXELS, whatever this limit is.
    pil_limit = 2 * Image.MAX_IMAGE_PIXELS
    if args.max_image_pixels > pil_limit:
        raise UsageError(f"--max_image_pixels must be between 1 and {pil_limit}, got {args.max_image_pixels}")
    if args.gpu is not None:
        if args.multi_gpu:
            raise UsageError("--gpu selects the device of a single-process run; leave it out with --multi_gpu")
        utils.select_device(args.gpu)
    check_data_args(args)
    check_paths(args)
    if args.val_fraction == 0 and args.val_file is None and args.select_metric.startswith("val_"):
        args.select_metric = "train_loss"
    if args.resume is not None and not Path(args.resume, utils.TRAINING_STATE_NAME).is_file():
        raise UsageError(f"--resume {args.resume} contains no {utils.TRAINING_STATE_NAME}; pass a run directory that train.py wrote")
    if args.resume is not None:
        finished = finished_epochs(Path(args.resume))
        if finished is not None and args.epochs <= finished:
            raise UsageError(
                f"--epochs {args.epochs}: the run in {args.resume} has already finished {finished} epochs; "
                f"pass --epochs {finished + 1} or more to continue it"
            )


def finished_epochs(run_dir):
    """Return the last epoch that metrics.jsonl records, or None for a run without one.

    metrics.jsonl is written after the checkpoint, so it never counts an epoch the checkpoint lacks.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    epochs = [json.loads(line)["epoch"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return max(epochs) if epochs else None


def check_data_args(args):
    """Raise UsageError for data options that do not go together, and fill in --image_check."""
    if args.train_file is not None and args.train_images_dir is None:
        raise UsageError("--train_file needs --train_images_dir, the folder that contains one image folder per paper")
    if args.train_file is None:
        for name in ("train_images_dir", "val_file", "val_images_dir"):
            if getattr(args, name) is not None:
                raise UsageError(f"--{name} needs --train_file; with --data_dir the validation split comes from --val_fraction")
    if args.val_images_dir is not None and args.val_file is None:
        raise UsageError("--val_images_dir needs --val_file")
    if args.image_check is None:
        args.image_check = "full" if args.train_file is None else "exists"


def check_paths(args):
    """Raise UsageError for a data folder, encoder folder, output or cache folder that cannot work."""
    # A folder without the CSV is reported by dataset.read_csv_file, which names the file.
    if args.train_file is None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data_dir {args.data_dir} is not a folder; pass the folder with {data.CSV_NAME} and one folder per paper")
    for name in ("train_file", "val_file"):
        value = getattr(args, name)
        if value is not None and not Path(value).is_file():
            raise UsageError(f"--{name} {value} not found; pass a SPIQA split such as train_val/SPIQA_train.json or a CSV")
    for name in ("train_images_dir", "val_images_dir"):
        value = getattr(args, name)
        if value is not None and not Path(value).is_dir():
            raise UsageError(f"--{name} {value} is not a folder; pass the folder with one image folder per paper")
    for name in ("vision_model", "text_model"):
        # A path that does not exist is taken for a model hub name.
        path = Path(getattr(args, name))
        if path.exists() and not Path(path, "config.json").is_file():
            raise UsageError(f"--{name} {path} has no config.json; pass a folder written by save_pretrained or a model hub name")
    for name in ("output_dir", "cache_dir"):
        value = getattr(args, name)
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise UsageError(f"--{name} {value} is a file; pass a folder path")


# ---------------------------------------------------------------------------------------------
# Data


def read_rows(args):
    """Return (rows, validation rows or None): the validated questions of --data_dir or --train_file, and of --val_file."""
    if args.train_file is None:
        if args.image_check == "full":
            return data.load_rows(args.data_dir, strict=args.strict, max_pixels=args.max_image_pixels), None
        if not Path(args.data_dir).is_dir():
            raise UsageError(f"--data_dir {args.data_dir} is not a folder; it must hold {data.CSV_NAME} and one folder per paper")
        csv_path = Path(args.data_dir) / data.CSV_NAME
        return data.load_question_file(csv_path, args.data_dir, args.strict, args.max_image_pixels, args.image_check), None

    rows = data.load_question_file(args.train_file, args.train_images_dir, args.strict, args.max_image_pixels, args.image_check)
    if args.val_file is None:
        return rows, None
    logger.info("validation questions come from --val_file %s; --val_fraction and --split_by are not used", args.val_file)
    val_images_dir = args.val_images_dir or args.train_images_dir
    val_rows = data.load_question_file(args.val_file, val_images_dir, args.strict, args.max_image_pixels, args.image_check)
    return rows, val_rows


def log_vocabulary(train_rows, val_rows, label_map, rare_answers):
    """Log and return how many training and validation questions fall outside the label map."""
    train_questions, train_answers = data.count_out_of_vocabulary(train_rows["answer"], label_map)
    val_questions, val_answers = data.count_out_of_vocabulary(val_rows["answer"], label_map)
    classes = len(label_map) - (data.OTHER_ANSWER in label_map)
    if rare_answers == "other":
        fate = f"mapped to {data.OTHER_ANSWER}"
    else:
        fate = "dropped"
    logger.info(
        "answer vocabulary: %d classes from %d distinct training answers", classes,
        len(set(train_rows["answer"])),
    )
    if train_questions:
        logger.warning(
            "%d of %d training questions (%d distinct answers) are outside the vocabulary and are %s (--rare_answers %s)",
            train_questions, len(train_rows), train_answers, fate, rare_answers,
        )
    if val_questions:
        val_fate = fate if rare_answers == "other" else "kept and always count as wrong"
        logger.warning(
            "%d of %d validation questions (%d distinct answers) are outside the vocabulary and are %s",
            val_questions, len(val_rows), val_answers, val_fate,
        )
    return {
        "classes": classes,
        "rare_answers": rare_answers,
        "train_questions": len(train_rows),
        "train_outside_questions": train_questions,
        "train_outside_answers": train_answers,
        "val_questions": len(val_rows),
        "val_outside_questions": val_questions,
        "val_outside_answers": val_answers,
    }


def prepare_data(args, context):
    """Read rows, split them, and build the label map, paper vocabulary, tokenizer and image settings."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.text_model)
        image_settings = data.ImageSettings.from_pretrained(args.vision_model)
    except (OSError, ValueError) as error:
        summary = str(error).splitlines()[0]
        raise UsageError(
            f"failed to load --text_model {args.text_model} or --vision_model {args.vision_model} ({summary}); "
            "pass folders written by save_pretrained or model hub names that are reachable"
        ) from None

    rows, val_file_rows = read_rows(args)
    if args.max_samples is not None:
        rows = rows.iloc[: args.max_samples].reset_index(drop=True)
        if val_file_rows is not None:
            val_file_rows = val_file_rows.iloc[: args.max_samples].reset_index(drop=True)
    if args.normalize_answers:
        rows["answer"] = rows["answer"].map(data.normalize_answer)
        if val_file_rows is not None:
            val_file_rows["answer"] = val_file_rows["answer"].map(data.normalize_answer)

    if val_file_rows is None:
        train_positions, val_positions = data.split_rows(rows, args.val_fraction, args.seed, split_by=args.split_by)
        train_rows = rows.iloc[train_positions].reset_index(drop=True)
        val_rows = rows.iloc[val_positions].reset_index(drop=True)
    else:
        # Positions then index the training and the validation file separately.
        train_positions, val_positions = np.arange(len(rows)), np.arange(len(val_file_rows))
        train_rows, val_rows = rows, val_file_rows

    label_map = data.build_label_map(
        train_rows["answer"], min_count=args.min_answer_count, max_classes=args.max_classes, rare_answers=args.rare_answers
    )
    vocabulary = log_vocabulary(train_rows, val_rows, label_map, args.rare_answers)
    train_labels = data.encode_labels(train_rows["answer"], label_map)
    unanswerable = sum(label < 0 for label in train_labels)
    if unanswerable:
        keep = [label >= 0 for label in train_labels]
        train_rows = train_rows[keep].reset_index(drop=True)
    if len(train_rows) == 0 or not label_map:
        raise UsageError("no training questions are left; lower --min_answer_count or --val_fraction")
    paper_vocab = data.build_paper_vocab(train_rows["paper_id"])

    image_cache = None
    if not args.no_image_cache:
        cache_dir = args.cache_dir or Path.home() / ".cache" / "spiqa" / "images"
        image_cache = data.ImageCache(cache_dir, image_settings)

    has_captions = "caption" in rows.columns and (val_file_rows is None or "caption" in val_file_rows.columns)
    if args.use_caption and not has_captions:
        logger.warning(
            "--use_caption: the data has no Caption column, so every question is encoded alone "
            "and run_config.json records use_caption false"
        )

    def make_dataset(frame):
        captions = list(frame["caption"]) if args.use_caption and "caption" in frame.columns else None
        encoded = data.EncodedQuestions(tokenizer, frame["question"], captions)
        return data.QuestionImageDataset(
            frame["image_path"],
            encoded,
            [data.paper_index(paper_vocab, paper_id) for paper_id in frame["paper_id"]],
            data.encode_labels(frame["answer"], label_map),
            image_settings,
            image_cache=image_cache,
        )

    logger.info(
        "%d training and %d validation questions, %d classes, %d papers",
        len(train_rows), len(val_rows), len(label_map), len(paper_vocab) - 1,
    )
    return {
        "rows": rows,
        "val_source_rows": rows if val_file_rows is None else val_file_rows,
        "train_positions": train_positions,
        "val_positions": val_positions,
        "train_rows": train_rows,
        "val_rows": val_rows,
        "train_dataset": make_dataset(train_rows),
        "val_dataset": make_dataset(val_rows),
        "label_map": label_map,
        "vocabulary": vocabulary,
        "use_caption": bool(args.use_caption and has_captions),
        "paper_vocab": paper_vocab,
        "tokenizer": tokenizer,
        "image_settings": image_settings,
    }


def make_loader(dataset, args, context, shuffle, pad_token_id, epoch_seed):
    sampler = DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=shuffle, seed=epoch_seed, drop_last=False
    )
    workers = args.num_workers
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=data.BatchCollator(pad_token_id),
        pin_memory=context.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


# ---------------------------------------------------------------------------------------------
# Frozen encoders: features computed once


@torch.no_grad()
def compute_features(model, dataset, args, context, pad_token_id):
    """Return (image_features, question_features) for every item, computed once with frozen encoders.

    Each rank encodes its share and the shares are gathered, so every rank has all features.
    An empty dataset returns two tensors with no rows.
    """
    if len(dataset) == 0:
        # An empty split, such as validation with --val_fraction 0, has nothing to stack.
        return (
            torch.zeros(0, model.vision_encoder.config.hidden_size),
            torch.zeros(0, model.text_encoder.config.hidden_size),
        )
    loader = make_loader(dataset, args, context, shuffle=False, pad_token_id=pad_token_id, epoch_seed=0)
    image_features = {}
    question_features = {}
    progress = tqdm(loader, desc="encoding", disable=not context.is_main_process, leave=False)
    for batch in progress:
        batch = move_batch(batch, context.device)
        with utils.autocast_context(context.device, args.mixed_precision, amp_dtype(args)):
            images = model.encode_image(batch["pixel_values"]).float().cpu()
            questions = model.encode_question(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).float().cpu()
        for position, row in enumerate(batch["rows"].tolist()):
            image_features[row] = images[position]
            question_features[row] = questions[position]

    items = utils.all_gather_objects(list(image_features.items()), context)
    image_features = dict(items)
    items = utils.all_gather_objects(list(question_features.items()), context)
    question_features = dict(items)
    order = range(len(dataset))
    return torch.stack([image_features[row] for row in order]), torch.stack([question_features[row] for row in order])


class FeatureDataset(torch.utils.data.Dataset):
    """Precomputed encoder features with their paper index and label, for head-only training."""

    def __init__(self, image_features, question_features, source):
        self.image_features = image_features
        self.question_features = question_features
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return {
            "image_features": self.image_features[index],
            "question_features": self.question_features[index],
            "paper_ids": torch.tensor(self.source.paper_indices[index], dtype=torch.long),
            "labels": torch.tensor(self.source.labels[index], dtype=torch.long),
            "rows": torch.tensor(index, dtype=torch.long),
        }


def make_feature_loader(dataset, args, context, shuffle, epoch_seed):
    sampler = DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=shuffle, seed=epoch_seed
    )
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=0)


# ---------------------------------------------------------------------------------------------
# Steps


def amp_dtype(args):
    return torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16


def move_batch(batch, device):
    non_blocking = device.type == "cuda"
    return {name: tensor.to(device, non_blocking=non_blocking) for name, tensor in batch.items()}


def model_inputs(batch):
    """Select the forward() arguments present in a batch of images and questions or of features."""
    names = ("paper_ids", "pixel_values", "input_ids", "attention_mask", "token_type_ids", "image_features", "question_features")
    return {name: batch[name] for name in names if name in batch}


def drop_paper_ids(paper_ids, probability):
    """Replace paper indices by the unknown-paper index 0 with the given probability."""
    if probability == 0:
        return paper_ids
    mask = torch.rand(paper_ids.shape, device=paper_ids.device) < probability
    return paper_ids.masked_fill(mask, 0)


def make_lr_schedule(optimizer, total_steps, warmup_ratio):
    warmup_steps = int(total_steps * warmup_ratio)

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(1, total_steps - warmup_steps)
        return max(0.0, (total_steps - step) / remaining)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model, loader, optimizer, scheduler, scaler, args, context, epoch, state):
    """Run one epoch and return the mean training loss over all ranks.

    Raises FloatingPointError naming the epoch, step and value when the loss is not finite.
    """
    model.train()
    if args.freeze_encoders:
        unwrap(model).vision_encoder.eval()
        unwrap(model).text_encoder.eval()

    loss_sum = torch.zeros((), device=context.device, dtype=torch.float64)
    batch_count = 0
    progress = tqdm(loader, desc=f"epoch {epoch}", disable=not context.is_main_process, leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)

    for micro_step, batch in enumerate(progress):
        batch = move_batch(batch, context.device)
        batch["paper_ids"] = drop_paper_ids(batch["paper_ids"], args.paper_dropout)
        is_update = (micro_step + 1) % args.grad_accum_steps == 0 or micro_step + 1 == len(loader)

        # Gradients are synchronised only on the micro-step that updates the weights.
        sync = context.is_distributed and not is_update
        with model.no_sync() if sync else contextlib.nullcontext():
            with utils.autocast_context(context.device, args.mixed_precision, amp_dtype(args)):
                logits = model(**model_inputs(batch))
                loss = F.cross_entropy(logits.float(), batch["labels"])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {loss.item()} at epoch {epoch}, step {state['step'] + 1}; "
                    "lower --learning_rate, try --amp_dtype bfloat16, or check the data"
                )
            scaler.scale(loss / args.grad_accum_steps).backward()

        loss_sum += loss.detach()
        batch_count += 1
        if not is_update:
            continue

        if args.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

        if context.device.type == "cuda" and args.empty_cache_interval and state["step"] % args.empty_cache_interval == 0:
            torch.cuda.empty_cache()
        if context.is_main_process and state["step"] % args.log_interval == 0:
            progress.set_postfix(loss=f"{loss_sum.item() / batch_count:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if args.max_steps is not None and state["step"] >= args.max_steps:
            break

    mean_loss = loss_sum.item() / max(1, batch_count)
    return utils.all_reduce_mean([mean_loss], context)[0]


@torch.no_grad()
def predict_rows(model, loader, args, context, top_k=5):
    """Return {row: (loss or None, top-k class indices, top-k probabilities)} for every row of a loader.

    Rows from all ranks are gathered; DistributedSampler's padding duplicates are merged by row.
    """
    model.eval()
    results = []
    for batch in tqdm(loader, desc="validating", disable=not context.is_main_process, leave=False):
        batch = move_batch(batch, context.device)
        with utils.autocast_context(context.device, args.mixed_precision, amp_dtype(args)):
            logits = model(**model_inputs(batch)).float()
        losses = F.cross_entropy(logits, batch["labels"].clamp(min=0), reduction="none")
        probabilities = logits.softmax(dim=-1)
        k = min(top_k, probabilities.shape[-1])
        top_probabilities, top_classes = probabilities.topk(k, dim=-1)
        for position, row in enumerate(batch["rows"].tolist()):
            label = batch["labels"][position].item()
            loss = losses[position].item() if label >= 0 else None
            results.append((row, loss, top_classes[position].tolist(), top_probabilities[position].tolist()))
    gathered = utils.all_gather_objects(results, context)
    return {row: (loss, classes, probabilities) for row, loss, classes, probabilities in gathered}


def baseline_metrics(train_rows, val_rows, label_map):
    """Score two trivial answerers on the validation rows: the most frequent training answer,
    and the most frequent training answer of the question's paper (else the global one)."""
    global_answer = Counter(train_rows["answer"]).most_common(1)[0][0]
    paper_answers = {
        paper_id: Counter(group["answer"]).most_common(1)[0][0] for paper_id, group in train_rows.groupby("paper_id")
    }
    gold = list(val_rows["answer"])
    guesses = {
        "most_frequent_answer": [global_answer] * len(gold),
        "paper_most_frequent_answer": [paper_answers.get(paper_id, global_answer) for paper_id in val_rows["paper_id"]],
    }
    baselines = {}
    for name, predicted in guesses.items():
        figures = {"accuracy": float(np.mean([p == g for p, g in zip(predicted, gold)])) if gold else None}
        figures.update(utils.text_metrics(predicted, gold))
        baselines[name] = figures
    return baselines


# ---------------------------------------------------------------------------------------------
# Run directory


def unwrap(model):
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def model_arguments(args, prepared):
    """Return the settings that build the network; train() adds the encoders' configs once they load.

    With those configs, the dict is everything predict.py needs to rebuild the network.
    """
    return {
        "vision_model": args.vision_model,
        "text_model": args.text_model,
        "num_classes": len(prepared["label_map"]),
        "num_papers": len(prepared["paper_vocab"]),
        "image_settings": prepared["image_settings"].to_dict(),
        "max_question_tokens": data.MAX_QUESTION_TOKENS,
        "paper_embedding_dim": PAPER_EMBEDDING_DIM,
        "hidden_dim": FUSION_HIDDEN_DIM,
        "dropout": args.dropout,
        "attn_implementation": args.attn_implementation,
        "use_caption": prepared["use_caption"],
        "normalize_answers": args.normalize_answers,
    }


def write_run_metadata(output_dir, args, prepared, model_args):
    """Write the tokenizer, image processor, label map, paper vocabulary, split and run config."""
    from transformers import AutoImageProcessor

    output_dir.mkdir(parents=True, exist_ok=True)
    prepared["tokenizer"].save_pretrained(output_dir / utils.TOKENIZER_DIR)
    AutoImageProcessor.from_pretrained(args.vision_model, use_fast=False).save_pretrained(output_dir / utils.IMAGE_PROCESSOR_DIR)
    utils.write_json(output_dir / utils.LABEL_MAP_NAME, prepared["label_map"])
    utils.write_json(output_dir / utils.PAPER_VOCAB_NAME, prepared["paper_vocab"])
    split = {
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "split_by": args.split_by,
        "row_numbering": "CSV data rows or JSON questions of the data file, from 1, in file order"
        + ("" if args.val_file is None else "; validation rows number those of --val_file"),
        "train": [int(row) for row in prepared["rows"]["csv_row"].iloc[prepared["train_positions"]]],
        "validation": [int(row) for row in prepared["val_source_rows"]["csv_row"].iloc[prepared["val_positions"]]],
    }
    utils.write_json(output_dir / "split.json", split)
    utils.write_json(output_dir / "vocabulary.json", prepared["vocabulary"])
    config = {"model": model_args, "args": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    utils.write_json(output_dir / utils.RUN_CONFIG_NAME, config)


def save_checkpoint(output_dir, model, optimizer, scheduler, scaler, state, is_best, history):
    """Write last.safetensors, model.safetensors when best, and then training_state.pt.

    Each file is written to a temporary name and renamed, and the weights they replace stay as
    previous.safetensors until training_state.pt names the new epoch. A kill at any moment thus
    leaves a training state whose weights are on disk (see resume_weights_path).

    NOTE: a kill during a write leaves its temporary file in output_dir, named with a leading dot
    and a .tmp suffix. Nothing reads it, so it may be deleted.
    """
    last_path = output_dir / LAST_WEIGHTS_NAME
    if last_path.is_file():
        keep_previous_weights(last_path, output_dir / PREVIOUS_WEIGHTS_NAME)
    progress = {"epoch": str(state["epoch"]), "step": str(state["step"])}
    utils.save_weights(unwrap(model), last_path, metadata=progress)
    if is_best:
        with utils.atomic_path(output_dir / utils.WEIGHTS_NAME) as temporary:
            shutil.copyfile(last_path, temporary)

    training_state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state["epoch"],
        "step": state["step"],
        "best_value": state["best_value"],
        "best_epoch": state["best_epoch"],
        "rng": utils.capture_rng_states(),
        "history": history,
    }
    utils.save_training_state(training_state, output_dir / utils.TRAINING_STATE_NAME)


def keep_previous_weights(last_path, previous_path):
    """Hard-link (or copy, where links fail) last_path to previous_path, atomically."""
    with utils.atomic_path(previous_path) as temporary:
        temporary.unlink()
        try:
            os.link(last_path, temporary)
        except OSError:
            shutil.copyfile(last_path, temporary)


def resume_weights_path(resume_dir, saved):
    """Return the weights file written at the epoch and step that the training state saved.

    Raises UsageError when neither last.safetensors nor previous.safetensors matches.
    """
    expected = {"epoch": str(saved["epoch"]), "step": str(saved["step"])}
    found = []
    for name in (LAST_WEIGHTS_NAME, PREVIOUS_WEIGHTS_NAME):
        path = resume_dir / name
        if not path.is_file():
            continue
        progress = utils.read_weights_metadata(path)
        if progress.get("epoch") is None:
            # Runs written before weights carried their epoch have only last.safetensors.
            return path
        if {key: progress.get(key) for key in expected} == expected:
            return path
        found.append(f"{name} at epoch {progress.get('epoch')}")
    raise UsageError(
        f"{resume_dir} has no weights for epoch {saved['epoch']} (step {saved['step']}) of "
        f"{utils.TRAINING_STATE_NAME}; found: {', '.join(found) or 'none'}. The run directory is damaged"
    )


def restore_checkpoint(resume_dir, model, optimizer, scheduler, scaler, context):
    """Load weights, optimizer, scheduler, scaler and random states of a run; returns its training state.

    Raises UsageError when the training state lacks a part or the weights do not fit the model.
    """
    saved = utils.load_training_state(resume_dir / utils.TRAINING_STATE_NAME)
    required = ("optimizer", "scheduler", "scaler", "epoch", "step", "best_value", "best_epoch", "rng")
    missing = [key for key in required if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise UsageError(f"{resume_dir / utils.TRAINING_STATE_NAME} lacks {', '.join(missing)}; it was not written by train.py")

    weights_path = resume_weights_path(resume_dir, saved)
    try:
        model.load_state_dict(utils.load_weights(weights_path, context.device))
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError) as error:
        summary = str(error).splitlines()[0]
        raise UsageError(f"{weights_path} does not fit the model of {utils.RUN_CONFIG_NAME} ({summary})") from None
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    utils.restore_rng_states(saved["rng"])
    return saved


def is_improvement(value, best, metric):
    if value is None:
        return best is None
    if best is None:
        return True
    return value > best if metric in HIGHER_IS_BETTER else value < best


def format_figure(value, digits=4):
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------


def train(args):
    context = utils.init_distributed(args.multi_gpu, args.local_rank, args.dist_timeout_minutes, gpu=args.gpu)
    utils.setup_logging(context.is_main_process)
    output_dir = Path(args.output_dir)
    if context.is_main_process:
        logger.info("device %s, %d process(es)", context.device, context.world_size)
    if context.is_main_process and args.resume is None and (output_dir / utils.TRAINING_STATE_NAME).is_file():
        logger.warning(
            "%s already contains a run; this run replaces its checkpoints. Stop and pass --resume %s to continue it",
            output_dir, output_dir,
        )

    if context.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    if args.mixed_precision and context.device.type == "cpu" and context.is_main_process:
        logger.info("--mixed_precision on a CPU uses bfloat16 autocast without a gradient scaler")

    # Every rank derives the same split, label map and initial weights from the seed.
    utils.seed_everything(args.seed)
    prepared = prepare_data(args, context)
    pad_token_id = prepared["tokenizer"].pad_token_id or 0

    utils.seed_everything(args.seed)
    model_args = model_arguments(args, prepared)
    model = build_model(model_args, pretrained=True)
    model_args["vision_config"] = model.vision_encoder.config.to_dict()
    model_args["text_config"] = model.text_encoder.config.to_dict()
    if args.freeze_encoders:
        model.freeze_encoders()
    model.to(context.device)

    if context.is_main_process:
        write_run_metadata(output_dir, args, prepared, model_args)

    # Data: images and questions, or encoder features computed once when the encoders are frozen.
    if args.freeze_encoders:
        started = time.perf_counter()
        train_features = compute_features(model, prepared["train_dataset"], args, context, pad_token_id)
        val_features = compute_features(model, prepared["val_dataset"], args, context, pad_token_id)
        logger.info("encoded all images and questions once in %.1f s", time.perf_counter() - started)
        train_data = FeatureDataset(*train_features, prepared["train_dataset"])
        val_data = FeatureDataset(*val_features, prepared["val_dataset"])
        train_loader = make_feature_loader(train_data, args, context, shuffle=True, epoch_seed=args.seed)
        val_loader = make_feature_loader(val_data, args, context, shuffle=False, epoch_seed=0)
    else:
        train_loader = make_loader(prepared["train_dataset"], args, context, True, pad_token_id, args.seed)
        val_loader = make_loader(prepared["val_dataset"], args, context, False, pad_token_id, 0)

    # Optimizer, schedule and gradient scaler; float16 needs the scaler, bfloat16 and float32 do not.
    use_fused = args.fused_adamw and context.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.optimizer_groups(args.weight_decay), lr=args.learning_rate, fused=use_fused or None)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    scheduler = make_lr_schedule(optimizer, total_steps, args.warmup_ratio)
    scaler_enabled = args.mixed_precision and context.device.type == "cuda" and args.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(context.device.type, enabled=scaler_enabled)

    state = {"epoch": 0, "step": 0, "best_value": None, "best_epoch": None}
    if args.resume is not None:
        resume_dir = Path(args.resume)
        saved = restore_checkpoint(resume_dir, model, optimizer, scheduler, scaler, context)
        state.update({key: saved[key] for key in ("epoch", "step", "best_value", "best_epoch")})
        if context.is_main_process:
            logger.info("resumed from %s after epoch %d (step %d)", resume_dir, state["epoch"], state["step"])

    if args.compile:
        model = torch.compile(model)
    if context.is_distributed:
        # find_unused_parameters stays off: every trainable parameter reaches the loss, and frozen ones are skipped.
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)

    baselines = baseline_metrics(prepared["train_rows"], prepared["val_rows"], prepared["label_map"]) if len(prepared["val_rows"]) else {}
    index_to_answer = {index: answer for answer, index in prepared["label_map"].items()}
    val_labels = prepared["val_dataset"].labels
    history = []
    if args.resume is not None and context.is_main_process:
        history = saved.get("history") or read_history(Path(args.resume))
    history = [row for row in history if row["epoch"] <= state["epoch"]]

    started = time.perf_counter()
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        train_loader.sampler.set_epoch(epoch)
        epoch_started = time.perf_counter()
        train_loss = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, args, context, epoch, state)
        epoch_seconds = time.perf_counter() - epoch_started

        metrics = {"epoch": epoch, "step": state["step"], "train_loss": train_loss, "epoch_seconds": epoch_seconds}
        if len(prepared["val_rows"]):
            predictions = predict_rows(model, val_loader, args, context)
            metrics.update(utils.evaluation_metrics(predictions, prepared["val_rows"], val_labels, index_to_answer))
        metrics["learning_rate"] = scheduler.get_last_lr()[0]
        state["epoch"] = epoch

        value = metrics.get(args.select_metric)
        if value is None and context.is_main_process:
            logger.warning(
                "epoch %d: %s is undefined (no held-out question has a training answer), so this epoch counts "
                "as the best; choose another --select_metric such as val_rouge_l", epoch, args.select_metric,
            )
        is_best = is_improvement(value, state["best_value"], args.select_metric)
        if is_best:
            state["best_value"], state["best_epoch"] = value, epoch

        if context.is_main_process:
            history.append(metrics)
            save_checkpoint(output_dir, model, optimizer, scheduler, scaler, state, is_best, history)
            write_history(output_dir, history)
            utils.plot_training_curves(history, baselines, output_dir / "training_curves.png")
            logger.info(
                "epoch %d: train loss %s, val loss %s, val accuracy %s, val ROUGE-L %s (%.1f s)%s",
                epoch, format_figure(train_loss), format_figure(metrics.get("val_loss")),
                format_figure(metrics.get("val_accuracy")), format_figure(metrics.get("val_rouge_l")),
                epoch_seconds, " best" if is_best else "",
            )
        if args.max_steps is not None and state["step"] >= args.max_steps:
            break

    if context.is_main_process:
        finish_run(output_dir, history, baselines, state, args, time.perf_counter() - started)
    utils.cleanup_distributed()


def read_history(output_dir):
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_history(output_dir, history):
    with utils.atomic_path(output_dir / "metrics.jsonl") as temporary:
        temporary.write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")


def finish_run(output_dir, history, baselines, state, args, seconds):
    """Write final_metrics.json and baselines.json, and log the model beside the baselines."""
    utils.write_json(output_dir / "baselines.json", baselines)
    best = next((row for row in history if row["epoch"] == state["best_epoch"]), history[-1] if history else {})
    final = {
        "best_epoch": state["best_epoch"],
        "select_metric": args.select_metric,
        "best": best,
        "last": history[-1] if history else {},
        "baselines": baselines,
        "train_seconds": seconds,
    }
    utils.write_json(output_dir / "final_metrics.json", final)

    logger.info("best epoch %s by %s; run directory %s", state["best_epoch"], args.select_metric, output_dir)
    if best.get("val_accuracy") is not None:
        logger.info("%-28s %9s %9s %9s %12s", "validation", "accuracy", "ROUGE-L", "BLEU", "exact match")
        logger.info(
            "%-28s %9s %9s %9s %12s", "model (best epoch)", format_figure(best["val_accuracy"]),
            format_figure(best["val_rouge_l"]), format_figure(best["val_bleu"], 2), format_figure(best["val_exact_match"]),
        )
        for name, figures in baselines.items():
            logger.info(
                "%-28s %9s %9s %9s %12s", name.replace("_", " "), format_figure(figures["accuracy"]),
                format_figure(figures["rouge_l"]), format_figure(figures["bleu"], 2), format_figure(figures["exact_match"]),
            )


def main(argv=None):
    try:
        args = parse_args(argv)
        train(args)
    except UsageError as error:
        utils.cleanup_distributed()
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as error:
        utils.cleanup_distributed()
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
