"""Shared helpers for train.py and predict.py: devices, distributed setup, seeding,
run-directory reading and writing, and the offline model writer.

Run ``python utils.py make-offline-models --output_dir offline_models`` to write small
random-initialised ViT and BERT checkpoints that work without the model hub.
"""

import argparse
import contextlib
import datetime
import json
import logging
import os
import random
import re
import string
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger("spiqa")

WEIGHTS_NAME = "model.safetensors"
RUN_CONFIG_NAME = "run_config.json"
LABEL_MAP_NAME = "label_map.json"
PAPER_VOCAB_NAME = "paper_vocab.json"
TRAINING_STATE_NAME = "training_state.pt"
TOKENIZER_DIR = "tokenizer"
IMAGE_PROCESSOR_DIR = "image_processor"
RUN_FILES = (WEIGHTS_NAME, RUN_CONFIG_NAME, LABEL_MAP_NAME, PAPER_VOCAB_NAME)


class UsageError(Exception):
    """A problem with the user's input that the scripts report as one line, without a traceback."""


def setup_logging(is_main_process=True, level=logging.INFO):
    """Send log records to stderr on rank 0; other ranks log errors only, so warnings appear once."""
    logging.basicConfig(
        level=level if is_main_process else logging.ERROR,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # The model hub client warns about missing tokens and network access on every load.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # rouge-score logs through absl on every scorer it builds, and matplotlib logs its font cache.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


@dataclass
class DistributedContext:
    """The process's place in a (possibly single-process) run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main_process(self):
        return self.rank == 0

    @property
    def is_distributed(self):
        return self.world_size > 1


def select_device(gpu=None):
    """Return cuda:GPU when CUDA is present (GPU 0 when gpu is None), else the CPU.

    Raises UsageError for a GPU index that does not exist or a GPU request on a machine without CUDA.
    """
    if not torch.cuda.is_available():
        if gpu is not None:
            raise UsageError(f"--gpu {gpu} was given but CUDA is not available; leave out --gpu to run on the CPU")
        return torch.device("cpu")

    index = 0 if gpu is None else gpu
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise UsageError(f"--gpu {index} does not exist: this machine has {count} GPU(s), indices 0 to {count - 1}")
    return torch.device("cuda", index)


def init_distributed(multi_gpu, local_rank_argument=-1, timeout_minutes=30, gpu=None):
    """Join the process group that torchrun or torch.distributed.launch set up, if any.

    Both launchers set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the deprecated launcher passes
    the local rank as an argument instead of LOCAL_RANK. NCCL is used with CUDA, gloo otherwise. A
    collective that waits longer than timeout_minutes raises, so one failed rank cannot hang the rest.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not multi_gpu or world_size == 1:
        if world_size > 1:
            raise UsageError(
                f"launched as {world_size} processes but --multi_gpu was not given; "
                "add --multi_gpu or launch a single process"
            )
        return DistributedContext(device=select_device(gpu))

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_argument))
    if local_rank < 0:
        raise UsageError("LOCAL_RANK is not set; launch with torchrun or torch.distributed.launch")

    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "lower --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"

    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if backend == "nccl" else None,
    )
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_states():
    """Return the Python, NumPy and torch random states as tensors and plain values (weights_only-safe)."""
    numpy_state = np.random.get_state()
    states = {
        "python": list(random.getstate()[1]),
        "python_position": random.getstate()[2],
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_position": int(numpy_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states):
    random.setstate((3, tuple(states["python"]), states["python_position"]))
    numpy_key = states["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", numpy_key, states["numpy_position"], 0, 0.0))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def autocast_context(device, enabled, dtype):
    """Return the autocast context for a step: dtype on CUDA, bfloat16 on a CPU, a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cpu":
        # CPU autocast supports bfloat16 only; float16 there would be slower and unscaled.
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside path and move it over path only if the block finishes.

    A crash or kill inside the block leaves the old file untouched, since os.replace is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path, data):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing; is {path.parent} a run directory written by train.py?") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not valid JSON ({error}); the run directory is damaged") from None


def save_weights(model, path, metadata=None):
    """Write the unwrapped model's state dict as safetensors, atomically, with string metadata.

    Tied or shared tensors are cloned so that safetensors accepts them.
    """
    from safetensors.torch import save_file

    state_dict = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(state_dict, str(temporary), metadata={"format": "pt", **(metadata or {})})


def read_weights_metadata(path):
    """Return the string metadata of a safetensors file without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except SafetensorError as error:
        raise UsageError(f"{path} is not a readable safetensors file ({error})") from None


def load_weights(path, device="cpu"):
    """Read a safetensors state dict, which contains tensors only, so loading runs no code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UsageError(f"{path} is missing; is {Path(path).parent} a run directory written by train.py?")
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as error:
        raise UsageError(f"{path} is not a readable safetensors file ({error})") from None


def save_training_state(state, path):
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_training_state(path):
    """Read optimizer, scheduler, scaler and progress state; weights_only=True refuses pickled code."""
    if not Path(path).is_file():
        raise UsageError(f"{path} is missing, so the run cannot be resumed; start it again without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError depending on the payload
        raise UsageError(f"{path} was rejected: it is not a plain tensor checkpoint ({error})") from None


def all_reduce_mean(values, context):
    """Average a list of floats across ranks; returns them unchanged in a single process."""
    if not context.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / context.world_size).tolist()


def all_gather_objects(items, context):
    """Concatenate a list from every rank, in rank order."""
    if not context.is_distributed:
        return list(items)
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, items)
    return [item for rank_items in gathered for item in rank_items]


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_for_exact_match(text):
    """Lower-case, drop punctuation and the articles a, an, the, and collapse white space."""
    text = text.lower()
    text = "".join(character for character in text if character not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def text_metrics(predictions, references):
    """Score predicted answers against gold answers with the SPIQA benchmark's text measures.

    Returns rouge_l (mean ROUGE-L F-measure from the rouge-score package, 0 to 1), bleu (corpus
    BLEU from sacrebleu, 0 to 100, its own scale) and exact_match (fraction equal after
    normalize_for_exact_match). An empty input returns None for each.
    """
    if not predictions:
        return {"rouge_l": None, "bleu": None, "exact_match": None}

    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = [scorer.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in zip(predictions, references)]
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    exact = [
        normalize_for_exact_match(prediction) == normalize_for_exact_match(reference)
        for prediction, reference in zip(predictions, references)
    ]
    return {"rouge_l": float(np.mean(rouge_l)), "bleu": float(bleu), "exact_match": float(np.mean(exact))}


def evaluation_metrics(predictions, rows, labels, index_to_answer, prefix="val_"):
    """Compute loss, accuracies, answerable fraction and text measures of predictions against rows."""
    order = sorted(predictions)
    gold = [rows["answer"].iloc[row] for row in order]
    predicted = [index_to_answer[predictions[row][1][0]] for row in order]
    answerable = [labels[row] >= 0 for row in order]
    correct = [predictions[row][1][0] == labels[row] for row in order]
    in_top5 = [labels[row] in predictions[row][1][:5] for row in order]
    losses = [predictions[row][0] for row in order if predictions[row][0] is not None]

    answerable_count = sum(answerable)
    metrics = {
        f"{prefix}loss": float(np.mean(losses)) if losses else None,
        f"{prefix}accuracy": float(np.mean(correct)) if order else None,
        f"{prefix}top5_accuracy": float(np.mean(in_top5)) if order else None,
        f"{prefix}answerable_fraction": answerable_count / len(order) if order else None,
        f"{prefix}accuracy_answerable": (
            sum(c for c, a in zip(correct, answerable) if a) / answerable_count if answerable_count else None
        ),
    }
    for name, value in text_metrics(predicted, gold).items():
        metrics[f"{prefix}{name}"] = value
    return metrics


def plot_training_curves(history, baselines, path):
    """Draw losses, accuracy and ROUGE-L per epoch, with baselines as dashed lines, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis, rouge_axis) = plt.subplots(1, 3, figsize=(15, 4.5), dpi=100)

    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    val_losses = [row.get("val_loss") for row in history]
    if any(value is not None for value in val_losses):
        loss_axis.plot(epochs, [np.nan if value is None else value for value in val_losses], marker="o", label="validation")
    loss_axis.set(title="Cross-entropy loss", xlabel="epoch", ylabel="loss")

    panels = (
        (accuracy_axis, "val_accuracy", "accuracy", "Validation accuracy (exact class)"),
        (rouge_axis, "val_rouge_l", "rouge_l", "Validation ROUGE-L F-measure"),
    )
    colors = ("tab:green", "tab:red")
    for axis, key, baseline_key, title in panels:
        values = [row.get(key) for row in history]
        axis.plot(epochs, [np.nan if value is None else value for value in values], marker="o", label="model")
        for color, (name, figures) in zip(colors, baselines.items()):
            if figures.get(baseline_key) is not None:
                axis.axhline(figures[baseline_key], linestyle="--", color=color, label=name.replace("_", " "))
        shown = [value for value in values if value is not None]
        ceiling = history[-1].get("val_answerable_fraction") if history and key == "val_accuracy" else None
        if ceiling is not None:
            axis.axhline(ceiling, linestyle=":", color="gray", label="answerable fraction (ceiling)")
            shown.append(ceiling)
        # Scores on unique free-text answers are small; a fixed 0-1 axis would flatten them.
        shown += [figures[baseline_key] for figures in baselines.values() if figures.get(baseline_key) is not None]
        top = min(1.0, max([0.05] + shown) * 1.25)
        axis.set(title=title, xlabel="epoch", ylim=(0, top))

    for axis in (loss_axis, accuracy_axis, rouge_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        if epochs:
            axis.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


def write_offline_models(output_dir, questions, hidden_size=32, layers=2, heads=2, vocab_size=2000, dropout=0.1):
    """Write small random-initialised ViT and BERT checkpoints in save_pretrained format.

    The BERT tokenizer is a real WordPiece tokenizer trained on questions; the ViT image processor
    carries the same settings as google/vit-base-patch16-224 (224x224, mean and std 0.5). Returns
    the paths of the two model directories.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    output_dir = Path(output_dir)
    # With the usual initializer_range of 0.02, a random 32-wide encoder gives nearly the same pooled
    # output for every input, and the head cannot tell questions apart; 0.2 keeps them distinct.
    vision_dir = output_dir / "vit-tiny"
    text_dir = output_dir / "bert-tiny"

    vision_config = ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden_size * 4,
        image_size=224,
        patch_size=32,
        initializer_range=0.2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    ViTModel(vision_config, add_pooling_layer=True).save_pretrained(vision_dir)
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        vision_dir
    )

    word_piece = BertWordPieceTokenizer(lowercase=True)
    word_piece.train_from_iterator(list(questions), vocab_size=vocab_size, min_frequency=1)
    tokenizer = BertTokenizerFast(tokenizer_object=word_piece._tokenizer, do_lower_case=True, model_max_length=512)
    if len(tokenizer) < 100:
        raise RuntimeError(f"the trained WordPiece tokenizer has only {len(tokenizer)} tokens; check the questions")
    tokenizer.save_pretrained(text_dir)

    text_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden_size * 4,
        max_position_embeddings=512,
        initializer_range=0.2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(text_config, add_pooling_layer=True).save_pretrained(text_dir)
    return vision_dir, text_dir


def main():
    parser = argparse.ArgumentParser(description="SPIQA maintenance commands.")
    commands = parser.add_subparsers(dest="command", required=True)

    offline = commands.add_parser(
        "make-offline-models", help="write small random-initialised ViT and BERT checkpoints for use without the hub"
    )
    offline.add_argument("--output_dir", default="offline_models", help="folder that receives vit-tiny/ and bert-tiny/")
    offline.add_argument("--data_dir", default="OverheatData", help="data set whose questions train the WordPiece vocabulary")
    offline.add_argument("--hidden_size", type=int, default=32, help="width of both encoders")
    offline.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout of both encoders")

    convert = commands.add_parser("convert-spiqa", help="convert a SPIQA release JSON split to the training CSV format")
    convert.add_argument("--json_file", required=True, help="SPIQA split, for example test-A/SPIQA_testA.json")
    convert.add_argument("--output_csv", required=True, help="CSV to write (paper_id,Question,Answer,Image,Caption)")

    args = parser.parse_args()
    setup_logging()

    # Run as a script this module is __main__, so dataset.py raises the UsageError class of the
    # separately imported utils module, which the except clause must name as well.
    from utils import UsageError as ImportedUsageError

    try:
        if args.command == "make-offline-models":
            from dataset import read_questions_for_tokenizer

            questions = read_questions_for_tokenizer(args.data_dir)
            vision_dir, text_dir = write_offline_models(
                args.output_dir, questions, hidden_size=args.hidden_size, dropout=args.dropout
            )
            logger.info("wrote %s and %s", vision_dir, text_dir)
            print(f"--vision_model {vision_dir} --text_model {text_dir}")
        elif args.command == "convert-spiqa":
            from dataset import convert_spiqa_json_to_csv

            count = convert_spiqa_json_to_csv(args.json_file, args.output_csv)
            logger.info("wrote %d questions to %s", count, args.output_csv)
    except (UsageError, ImportedUsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
