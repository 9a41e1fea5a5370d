"""Measure SPIQA's data loading, training and prediction speed against plain counterparts.

    python benchmarks/run.py --quick --output benchmarks/results.jsonl

Each measurement runs in its own child process, so its peak memory is that process's maximum
resident set size (ru_maxrss from os.wait4). The figures are printed as a table and written as
JSON lines, each with its speed-up over the plain counterpart.
"""

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

import dataset as data  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from model import build_model  # noqa: E402

logger = logging.getLogger("spiqa")

PLAIN_PAD_LENGTH = data.MAX_QUESTION_TOKENS
# Options of each training variant: attention kernel, padding, image cache and bfloat16 autocast.
TRAIN_VARIANTS = {
    "plain": {"attn_implementation": "eager", "pad_to": PLAIN_PAD_LENGTH, "image_cache": False, "mixed_precision": False},
    "ours": {"attn_implementation": "sdpa", "pad_to": None, "image_cache": True, "mixed_precision": False},
    "ours_bf16": {"attn_implementation": "sdpa", "pad_to": None, "image_cache": True, "mixed_precision": True},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark SPIQA data loading, training and prediction against plain baselines.")
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "OverheatData"), help="folder with training_data.csv and one image folder per paper")
    parser.add_argument("--output", default=None, help="JSON lines file for the results (default: print the table only)")
    parser.add_argument("--quick", action="store_true", help="fewer rows and steps, about five minutes on two CPU cores with the full-size model")
    parser.add_argument("--tiny", action="store_true", help="use tiny random encoders instead of ViT-B/16 and BERT-base, for tests")
    parser.add_argument("--work_dir", default=None, help="folder for models, caches and the run directory (default: a temporary folder, removed at the end)")
    parser.add_argument("--batch_size", type=int, default=16, help="questions per training and prediction step")
    parser.add_argument("--load_rows", type=int, default=None, help="questions read per data-loading pass (default: all, 160 with --quick)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="untimed training steps before the timed ones (default: 1)")
    parser.add_argument("--train_steps", type=int, default=None, help="timed full fine-tuning steps per variant (default: 4, 1 with --quick)")
    parser.add_argument("--feature_rows", type=int, default=None, help="questions encoded once for the frozen-encoder epochs (default: 64, 16 with --quick)")
    parser.add_argument("--head_epochs", type=int, default=None, help="timed head-only epochs over the encoded questions (default: 5, 3 with --quick)")
    parser.add_argument("--predict_rows", type=int, default=None, help="questions answered by one batched predict.py process (default: 64, 16 with --quick)")
    parser.add_argument("--single_predictions", type=int, default=None, help="questions answered by one predict.py process each (default: 4, 2 with --quick)")
    parser.add_argument("--sections", default="abcd", help="sections to measure: a data loading, b training step, c epoch (needs b), d prediction")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads of every measured process")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case_options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    defaults = {
        "load_rows": (None, 160),
        "warmup_steps": (1, 1),
        "train_steps": (4, 1),
        "feature_rows": (64, 16),
        "head_epochs": (5, 3),
        "predict_rows": (64, 16),
        "single_predictions": (4, 2),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("batch_size", "train_steps", "feature_rows", "head_epochs", "predict_rows", "single_predictions", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.sections or set(args.sections) - set("abcd"):
        parser.error(f"--sections must be letters from abcd, got {args.sections!r}")
    if "c" in args.sections and "b" not in args.sections:
        parser.error("--sections c compares against the training step of section b; add b")
    if args.warmup_steps < 0:
        parser.error(f"--warmup_steps must be 0 or more, got {args.warmup_steps}")
    return args


# ---------------------------------------------------------------------------------------------
# Inputs shared by the measured processes


def write_models(work_dir, data_dir, tiny):
    """Write the vision and text checkpoints that every case loads; return (vision_dir, text_dir).

    The tokenizer and image processor are the offline ones (a WordPiece vocabulary trained on the
    questions, and ViT-B/16's 224x224 preprocessing). Without tiny, the encoders are ViT-B/16 and
    BERT-base built from default configs with random weights.
    """
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    offline_vision, offline_text = utils.write_offline_models(
        work_dir / "offline", data.read_questions_for_tokenizer(data_dir), dropout=0.0
    )
    if tiny:
        return offline_vision, offline_text

    torch.manual_seed(0)
    vision_dir = work_dir / "vit-base"
    ViTModel(ViTConfig(), add_pooling_layer=True).save_pretrained(vision_dir)
    shutil.copy(offline_vision / "preprocessor_config.json", vision_dir)

    text_dir = work_dir / "bert-base"
    BertModel(BertConfig(), add_pooling_layer=True).save_pretrained(text_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(offline_text / name, text_dir)
    return vision_dir, text_dir


def load_inputs(args, options):
    """Read the questions, tokenizer, image settings, label map and paper vocabulary of a case."""
    from transformers import AutoTokenizer

    # The parent process has validated every image once; the cases skip that check.
    frame = data.read_csv_file(Path(args.data_dir) / data.CSV_NAME)
    rows = data.validate_rows(frame, args.data_dir, check_images=False).rows
    train_positions, _ = data.split_rows(rows, 0.2, 42)
    tokenizer = AutoTokenizer.from_pretrained(options["text_model"])
    return {
        "rows": rows,
        "train_split_size": len(train_positions),
        "tokenizer": tokenizer,
        "pad_token_id": tokenizer.pad_token_id or 0,
        "image_settings": data.ImageSettings.from_pretrained(options["vision_model"]),
        "label_map": data.build_label_map(rows["answer"]),
        "paper_vocab": data.build_paper_vocab(rows["paper_id"]),
    }


def make_dataset(inputs, count, cache_dir):
    """Return a QuestionImageDataset over the first count rows, decoding images when cache_dir is None."""
    rows = inputs["rows"].iloc[:count]
    image_cache = data.ImageCache(cache_dir, inputs["image_settings"]) if cache_dir is not None else None
    return data.QuestionImageDataset(
        rows["image_path"],
        data.tokenize_questions(inputs["tokenizer"], list(rows["question"])),
        [data.paper_index(inputs["paper_vocab"], paper_id) for paper_id in rows["paper_id"]],
        data.encode_labels(rows["answer"], inputs["label_map"]),
        inputs["image_settings"],
        image_cache=image_cache,
    )


def make_model(inputs, options, attn_implementation, device):
    model_args = {
        "vision_model": options["vision_model"],
        "text_model": options["text_model"],
        "num_classes": len(inputs["label_map"]),
        "num_papers": len(inputs["paper_vocab"]),
        "image_settings": inputs["image_settings"].to_dict(),
        "attn_implementation": attn_implementation,
    }
    torch.manual_seed(0)
    return build_model(model_args, pretrained=True).to(device)


def training_args(args, mixed_precision, freeze_encoders):
    """Return the train.py options that train_one_epoch and compute_features read."""
    return argparse.Namespace(
        batch_size=args.batch_size, num_workers=0, freeze_encoders=freeze_encoders, paper_dropout=0.1,
        grad_accum_steps=1, mixed_precision=mixed_precision, amp_dtype="bfloat16", max_grad_norm=1.0,
        empty_cache_interval=0, log_interval=10, max_steps=None,
    )


def make_training_state(model, total_steps):
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.01), lr=2e-5)
    scheduler = train.make_lr_schedule(optimizer, total_steps, 0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return optimizer, scheduler, scaler, {"epoch": 0, "step": 0}


# ---------------------------------------------------------------------------------------------
# Cases, each run in a child process that prints one JSON object


def case_data_loading(args, options):
    """Iterate the data loader once and return samples per second."""
    inputs = load_inputs(args, options)
    count = min(args.load_rows or len(inputs["rows"]), len(inputs["rows"]))
    dataset = make_dataset(inputs, count, options.get("cache_dir"))
    collator = data.BatchCollator(inputs["pad_token_id"], pad_to=options.get("pad_to"))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=0, collate_fn=collator)

    started = time.perf_counter()
    for _ in tqdm(loader, desc="loading", leave=False):
        pass
    seconds = time.perf_counter() - started
    return {"samples_per_second": count / seconds, "samples": count, "seconds": seconds}


def case_training(args, options):
    """Time full fine-tuning steps of one variant with train_one_epoch; return samples per second."""
    variant = TRAIN_VARIANTS[options["variant"]]
    device = utils.select_device()
    inputs = load_inputs(args, options)
    cache_dir = options["cache_dir"] if variant["image_cache"] else None
    count = args.batch_size * (args.warmup_steps + args.train_steps)
    dataset = make_dataset(inputs, min(count, len(inputs["rows"])), cache_dir)
    if cache_dir is not None:
        # Fill the image cache untimed, so that the cached variants read warm images even without section a.
        for index in range(len(dataset)):
            dataset.load_image(index)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True,
        collate_fn=data.BatchCollator(inputs["pad_token_id"], pad_to=variant["pad_to"]),
        generator=torch.Generator().manual_seed(0),
    )
    model = make_model(inputs, options, variant["attn_implementation"], device)
    train_args = training_args(args, variant["mixed_precision"], freeze_encoders=False)
    optimizer, scheduler, scaler, state = make_training_state(model, args.warmup_steps + args.train_steps)
    context = utils.DistributedContext(device=device)

    if args.warmup_steps:
        train_args.max_steps = args.warmup_steps
        train.train_one_epoch(model, loader, optimizer, scheduler, scaler, train_args, context, 0, state)
    # train_one_epoch restarts the loader on each call, so the timed steps reshuffle the same rows.
    train_args.max_steps = args.warmup_steps + args.train_steps
    started = time.perf_counter()
    train.train_one_epoch(model, loader, optimizer, scheduler, scaler, train_args, context, 1, state)
    seconds = time.perf_counter() - started

    steps = state["step"] - args.warmup_steps
    samples_per_second = steps * args.batch_size / seconds
    return {
        "samples_per_second": samples_per_second,
        "seconds_per_step": seconds / steps,
        "steps": steps,
        "epoch_seconds": inputs["train_split_size"] / samples_per_second,
        "train_split_size": inputs["train_split_size"],
        **peak_device_memory(device),
    }


def case_frozen(args, options):
    """Encode questions once with frozen encoders, then time head-only epochs over the features."""
    device = utils.select_device()
    inputs = load_inputs(args, options)
    count = min(args.feature_rows, len(inputs["rows"]))
    dataset = make_dataset(inputs, count, options["cache_dir"])
    model = make_model(inputs, options, "sdpa", device)
    model.freeze_encoders()
    train_args = training_args(args, mixed_precision=False, freeze_encoders=True)
    context = utils.DistributedContext(device=device)

    started = time.perf_counter()
    features = train.compute_features(model, dataset, train_args, context, inputs["pad_token_id"])
    encode_seconds = time.perf_counter() - started

    loader = train.make_feature_loader(train.FeatureDataset(*features, dataset), train_args, context, shuffle=True, epoch_seed=0)
    optimizer, scheduler, scaler, state = make_training_state(model, args.head_epochs * len(loader))
    epoch_seconds = []
    for epoch in range(1, args.head_epochs + 1):
        loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        train.train_one_epoch(model, loader, optimizer, scheduler, scaler, train_args, context, epoch, state)
        epoch_seconds.append(time.perf_counter() - started)

    # NOTE: the epochs cover count questions; the split-sized figures scale them per question.
    seconds_per_sample = statistics.median(epoch_seconds) / count
    return {
        "samples": count,
        "encode_seconds_per_sample": encode_seconds / count,
        "head_seconds_per_sample": seconds_per_sample,
        "epoch_seconds": seconds_per_sample * inputs["train_split_size"],
        "encode_seconds": encode_seconds / count * inputs["train_split_size"],
        "train_split_size": inputs["train_split_size"],
        **peak_device_memory(device),
    }


def peak_device_memory(device):
    if device.type != "cuda":
        return {}
    return {"peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20}


CASES = {"data_loading": case_data_loading, "training": case_training, "frozen": case_frozen}


# ---------------------------------------------------------------------------------------------
# Child processes


def child_env(args):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_process(command, args, log_path):
    """Run command to completion; return (stdout, wall seconds, peak resident memory in MiB).

    Standard error goes to log_path. Raises RuntimeError with the log's tail when the command fails.
    """
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(str(part) for part in command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(args), stdout=subprocess.PIPE, stderr=log, text=True)
        stdout = process.stdout.read()
        process.stdout.close()
        # os.wait4 reports this child's own rusage, unlike RUSAGE_CHILDREN, which keeps the maximum over all children.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started

    if process.returncode != 0:
        tail = Path(log_path).read_text(encoding="utf-8")[-3000:]
        raise RuntimeError(f"{command[1]} exited with {process.returncode}; end of {log_path}:\n{tail}")
    return stdout, seconds, usage.ru_maxrss / 1024


def run_case(name, args, options, log_path):
    """Run one case of CASES in a child process and return its figures with peak_rss_mib."""
    command = [
        sys.executable, __file__, "--case", name, "--case_options", json.dumps(options),
        "--data_dir", args.data_dir, "--batch_size", str(args.batch_size), "--threads", str(args.threads),
        "--warmup_steps", str(args.warmup_steps), "--train_steps", str(args.train_steps),
        "--feature_rows", str(args.feature_rows), "--head_epochs", str(args.head_epochs),
    ]
    if args.load_rows is not None:
        command += ["--load_rows", str(args.load_rows)]
    stdout, _, peak_rss_mib = run_process(command, args, log_path)
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["peak_rss_mib"] = peak_rss_mib
    return figures


def run_child_case(args):
    """Run the case named by --case in this process and print its figures as one JSON line."""
    utils.setup_logging()
    torch.set_num_threads(args.threads)
    options = json.loads(args.case_options)
    figures = CASES[args.case](args, options)
    print(json.dumps(figures), flush=True)


# ---------------------------------------------------------------------------------------------
# Sections


def record(section, case, metric, value, plain_value, peak_rss_mib, higher_is_better=True, note=""):
    """Return one result row; speedup is how many times better than the plain counterpart it is."""
    speedup = value / plain_value if higher_is_better else plain_value / value
    return {
        "section": section, "case": case, "metric": metric, "value": value,
        "speedup_vs_plain": speedup, "peak_rss_mib": peak_rss_mib, "note": note,
    }


def measure_data_loading(args, models, work_dir, log_path):
    options = {"vision_model": str(models[0]), "text_model": str(models[1])}
    plain = run_case("data_loading", args, {**options, "pad_to": PLAIN_PAD_LENGTH}, log_path)
    ours_options = {**options, "cache_dir": str(work_dir / "image_cache")}
    cold = run_case("data_loading", args, ours_options, log_path)
    warm = run_case("data_loading", args, ours_options, log_path)

    base = plain["samples_per_second"]
    note = f"{plain['samples']} questions, batch {args.batch_size}, no workers"
    return [
        record("a data loading", "plain: decode PNG, pad to 128", "samples/s", base, base, plain["peak_rss_mib"], note=note),
        record("a data loading", "ours: cache cold, dynamic pad", "samples/s", cold["samples_per_second"], base, cold["peak_rss_mib"], note=note),
        record("a data loading", "ours: cache warm, dynamic pad", "samples/s", warm["samples_per_second"], base, warm["peak_rss_mib"], note=note),
    ]


def measure_training(args, models, work_dir, log_path):
    options = {"vision_model": str(models[0]), "text_model": str(models[1]), "cache_dir": str(work_dir / "image_cache")}
    results = {variant: run_case("training", args, {**options, "variant": variant}, log_path) for variant in TRAIN_VARIANTS}

    base = results["plain"]["samples_per_second"]
    note = f"batch {args.batch_size}, {args.train_steps} timed step(s) after {args.warmup_steps} warm-up"
    names = {
        "plain": "plain: fp32, eager, pad 128, decode",
        "ours": "ours (default): fp32, sdpa, dynamic, cache",
        "ours_bf16": "ours --mixed_precision: bf16 autocast",
    }
    rows = [
        record("b training step", names[variant], "samples/s", figures["samples_per_second"], base, figures["peak_rss_mib"], note=note)
        for variant, figures in results.items()
    ]
    return rows, results


def measure_frozen(args, models, work_dir, log_path, training):
    options = {"vision_model": str(models[0]), "text_model": str(models[1]), "cache_dir": str(work_dir / "image_cache")}
    frozen = run_case("frozen", args, options, log_path)

    full = training["ours"]
    split = full["train_split_size"]
    return [
        record("c epoch", "full fine-tuning (ours, fp32)", "s/epoch", full["epoch_seconds"], full["epoch_seconds"],
               full["peak_rss_mib"], higher_is_better=False, note=f"{split} questions at the measured step rate"),
        record("c epoch", "--freeze_encoders, features warm", "s/epoch", frozen["epoch_seconds"], full["epoch_seconds"],
               frozen["peak_rss_mib"], higher_is_better=False, note=f"head only, median of {args.head_epochs} epochs over {frozen['samples']} questions, scaled to {split}"),
        record("c epoch", "--freeze_encoders, encoding once", "s", frozen["encode_seconds"], full["epoch_seconds"],
               frozen["peak_rss_mib"], higher_is_better=False, note=f"one-time feature pass over {split} questions, scaled from {frozen['samples']}"),
    ]


def measure_prediction(args, models, work_dir, log_path):
    """Train a run directory, then answer questions with one process each and with one batched process."""
    import pandas as pd

    run_dir = work_dir / "run"
    train_samples = max(args.batch_size, 8)
    run_process([
        sys.executable, "train.py", "--data_dir", args.data_dir, "--vision_model", str(models[0]),
        "--text_model", str(models[1]), "--output_dir", str(run_dir), "--cache_dir", str(work_dir / "image_cache"),
        "--num_workers", "0", "--freeze_encoders", "--max_samples", str(train_samples), "--val_fraction", "0",
        "--epochs", "1", "--batch_size", str(args.batch_size),
    ], args, log_path)

    frame = pd.read_csv(Path(args.data_dir) / data.CSV_NAME, dtype=str, keep_default_na=False)
    questions = frame.iloc[: args.predict_rows]
    questions_csv = work_dir / "questions.csv"
    questions.to_csv(questions_csv, index=False)
    _, batched_seconds, batched_rss = run_process([
        sys.executable, "predict.py", "--checkpoint_dir", str(run_dir), "--input_csv", str(questions_csv),
        "--output_csv", str(work_dir / "answers.csv"), "--data_dir", args.data_dir, "--num_workers", "0",
        "--batch_size", str(args.batch_size), "--cache_dir", str(work_dir / "image_cache"),
    ], args, log_path)

    single_seconds = []
    single_rss = []
    for row in frame.iloc[: args.single_predictions].itertuples(index=False):
        image = Path(args.data_dir) / row.paper_id / row.Image
        _, seconds, peak_rss_mib = run_process([
            sys.executable, "predict.py", "--checkpoint_dir", str(run_dir), "--paper_id", row.paper_id,
            "--image", str(image), "--question", row.Question, "--json",
        ], args, log_path)
        single_seconds.append(seconds)
        single_rss.append(peak_rss_mib)

    base = statistics.mean(single_seconds)
    batched = batched_seconds / len(questions)
    return [
        record("d prediction", "plain: one predict.py per question", "s/question", base, base, max(single_rss),
               higher_is_better=False, note=f"mean of {len(single_seconds)} processes"),
        record("d prediction", "ours: one predict.py --input_csv", "s/question", batched, base, batched_rss,
               higher_is_better=False, note=f"{len(questions)} questions, batch {args.batch_size}, whole process"),
    ]


# ---------------------------------------------------------------------------------------------


def format_table(rows):
    header = f"{'section':<16} {'case':<44} {'value':>10} {'unit':<10} {'speed-up':>8} {'peak RSS':>9}  note"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['section']:<16} {row['case']:<44} {row['value']:>10.3f} {row['metric']:<10} "
            f"{row['speedup_vs_plain']:>7.2f}x {row['peak_rss_mib']:>6.0f} MiB  {row['note']}"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.case is not None:
        run_child_case(args)
        return

    utils.setup_logging()
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="spiqa-benchmark-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "benchmark.log"
    logger.info("writing models, caches and logs under %s", work_dir)

    try:
        started = time.perf_counter()
        data.load_rows(args.data_dir)
        models = write_models(work_dir, Path(args.data_dir), args.tiny)
        rows = []
        if "a" in args.sections:
            logger.info("measuring data loading")
            rows += measure_data_loading(args, models, work_dir, log_path)
        if "b" in args.sections:
            logger.info("measuring training steps (%s encoders)", "tiny" if args.tiny else "full-size")
            training_rows, training = measure_training(args, models, work_dir, log_path)
            rows += training_rows
        if "c" in args.sections:
            logger.info("measuring frozen-encoder epochs")
            rows += measure_frozen(args, models, work_dir, log_path, training)
        if "d" in args.sections:
            logger.info("measuring prediction")
            rows += measure_prediction(args, models, work_dir, log_path)
        logger.info("finished in %.0f s", time.perf_counter() - started)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    settings = {
        "model": "tiny" if args.tiny else "ViT-B/16 + BERT-base (random weights)",
        "device": str(utils.select_device()),
        "threads": args.threads,
        "quick": args.quick,
        "torch": torch.__version__,
    }
    print(format_table(rows))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({**row, **settings}) + "\n")
        logger.info("wrote %d results to %s", len(rows), args.output)


if __name__ == "__main__":
    main()
