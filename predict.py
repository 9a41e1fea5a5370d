"""Answer questions about paper figures with a run directory that train.py wrote.

    python predict.py --checkpoint_dir runs/spiqa --paper_id 1611.04684v1 \\
        --image OverheatData/1611.04684v1/1611.04684v1-Table5-1.png --question "Which model performs best?"
    python predict.py --checkpoint_dir runs/spiqa --input_csv questions.csv --output_csv answers.csv
    python predict.py --checkpoint_dir runs/spiqa --interactive < questions.jsonl
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import dataset as data
import utils
from model import build_model
from utils import UsageError

logger = logging.getLogger("spiqa")

# The words that error messages use for each input: command-line options, or --interactive JSON keys.
OPTION_NAMES = {"paper_id": "--paper_id", "image": "--image", "question": "--question"}
JSON_KEY_NAMES = {"paper_id": "paper_id", "image": "image", "question": "question"}


# Model settings in run_config.json that build_model and Predictor read.
MODEL_KEYS = ("vision_model", "text_model", "vision_config", "text_config", "num_classes", "num_papers", "image_settings")


class Predictor:
    """A trained classifier loaded once, with its tokenizer, image settings, label map and papers."""

    def __init__(self, checkpoint_dir, device, mixed_precision=False, weights="best"):
        from transformers import AutoTokenizer

        self.checkpoint_dir = Path(checkpoint_dir)
        if not self.checkpoint_dir.is_dir():
            raise UsageError(f"--checkpoint_dir {checkpoint_dir} is not a folder; pass the --output_dir of a train.py run")
        missing = [name for name in (*utils.RUN_FILES, utils.TOKENIZER_DIR) if not (self.checkpoint_dir / name).exists()]
        if weights == "last":
            missing = [name for name in missing if name != utils.WEIGHTS_NAME]
        if missing:
            raise UsageError(
                f"{self.checkpoint_dir} is missing {', '.join(missing)}; it is not a finished train.py run directory"
            )

        config = utils.read_json(self.checkpoint_dir / utils.RUN_CONFIG_NAME)
        model_args = config.get("model") if isinstance(config, dict) else None
        if not isinstance(model_args, dict):
            raise UsageError(f"{self.checkpoint_dir / utils.RUN_CONFIG_NAME} has no model section; it was written by another program")
        missing_keys = [key for key in MODEL_KEYS if key not in model_args]
        if missing_keys:
            raise UsageError(
                f"{self.checkpoint_dir / utils.RUN_CONFIG_NAME} lacks model settings {', '.join(missing_keys)}; "
                "the run was written by an older train.py, so train it again"
            )
        self.model_args = model_args
        self.label_map = utils.read_json(self.checkpoint_dir / utils.LABEL_MAP_NAME)
        self.paper_vocab = utils.read_json(self.checkpoint_dir / utils.PAPER_VOCAB_NAME)
        if len(self.label_map) != self.model_args["num_classes"]:
            raise UsageError(
                f"{utils.LABEL_MAP_NAME} has {len(self.label_map)} answers but the model was built for "
                f"{self.model_args['num_classes']}; the run directory mixes files from different runs"
            )
        if len(self.paper_vocab) != self.model_args["num_papers"] or any(
            not isinstance(index, int) or not 0 <= index < len(self.paper_vocab) for index in self.paper_vocab.values()
        ):
            raise UsageError(
                f"{utils.PAPER_VOCAB_NAME} has {len(self.paper_vocab)} papers but the model was built for "
                f"{self.model_args['num_papers']}; the run directory mixes files from different runs"
            )
        self.index_to_answer = {index: answer for answer, index in self.label_map.items()}

        self.device = device
        self.mixed_precision = mixed_precision
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint_dir / utils.TOKENIZER_DIR)
        self.image_settings = data.ImageSettings.from_dict(self.model_args["image_settings"])
        self.use_caption = bool(self.model_args.get("use_caption", False))
        self.max_question_tokens = self.model_args.get("max_question_tokens", data.MAX_QUESTION_TOKENS)

        self.model = build_model(self.model_args, pretrained=False)
        file_name = utils.WEIGHTS_NAME if weights == "best" else "last.safetensors"
        state_dict = utils.load_weights(self.checkpoint_dir / file_name)
        try:
            self.model.load_state_dict(state_dict)
        except RuntimeError as error:
            summary = str(error).splitlines()[0]
            raise UsageError(
                f"{self.checkpoint_dir / file_name} does not fit the architecture in {utils.RUN_CONFIG_NAME} ({summary}); "
                "the weights come from another run or model"
            ) from None
        self.model.to(device).eval()

    def encode(self, questions, captions=None):
        if not self.use_caption:
            captions = None
        return data.tokenize_questions(self.tokenizer, questions, captions, max_length=self.max_question_tokens)

    def paper_indices(self, paper_ids):
        return [data.paper_index(self.paper_vocab, paper_id) for paper_id in paper_ids]

    @torch.no_grad()
    def predict_batch(self, batch, top_k):
        """Return one result dict per item of a collated batch: answer, confidence and top_k."""
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        names = ("paper_ids", "pixel_values", "input_ids", "attention_mask", "token_type_ids")
        with utils.autocast_context(self.device, self.mixed_precision, torch.float16):
            logits = self.model(**{name: batch[name] for name in names}).float()
        probabilities = logits.softmax(dim=-1)
        top_probabilities, top_classes = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)

        results = []
        for classes, probs in zip(top_classes.tolist(), top_probabilities.tolist()):
            ranked = [{"answer": self.index_to_answer[c], "probability": p} for c, p in zip(classes, probs)]
            results.append({"answer": ranked[0]["answer"], "confidence": ranked[0]["probability"], "top_k": ranked,
                            "classes": classes})
        return results

    def answer(self, paper_id, image_path, question, caption="", top_k=5, names=OPTION_NAMES):
        """Answer one question about one image; returns {"answer", "confidence", "top_k"}."""
        check_question_inputs(paper_id, image_path, question, names)
        if paper_id not in self.paper_vocab:
            logger.warning("paper %s was not seen in training; using the unknown-paper embedding", paper_id)

        dataset = data.QuestionImageDataset(
            [image_path], self.encode([question], [caption]), self.paper_indices([paper_id]), [-1], self.image_settings
        )
        batch = data.BatchCollator(self.tokenizer.pad_token_id or 0)([dataset[0]])
        result = self.predict_batch(batch, top_k)[0]
        result.pop("classes")
        return result


def check_question_inputs(paper_id, image_path, question, names=OPTION_NAMES):
    """Raise UsageError for an empty question, a malformed paper id, or an image that cannot be read.

    names maps each input to the word used for it in messages: the option or the JSON key.
    """
    if not question or not question.strip():
        raise UsageError(f"{names['question']} is empty; pass the question text")
    if not data.PAPER_ID_PATTERN.match(paper_id) or ".." in paper_id:
        raise UsageError(f"{names['paper_id']} {paper_id!r} is not a paper id; use an arXiv-style id such as 1611.04684v1")
    if not Path(image_path).is_file():
        raise UsageError(f"{names['image']} {image_path} not found")
    problem = data.check_image_file(image_path, data.DEFAULT_MAX_IMAGE_PIXELS)
    if problem is not None:
        raise UsageError(f"{names['image']} {image_path}: {problem[0]}: {problem[1]}")


def predict_csv(predictor, args):
    """Answer every valid row of --input_csv in batches and write --output_csv.

    The output keeps the input columns and adds predicted_answer, confidence and top_k (a JSON
    list). When the input has answers, validation measures are logged and written to
    <output_csv>.metrics.json. Returns those measures, or None without answers.
    """
    input_csv = Path(args.input_csv)
    data_dir = Path(args.data_dir) if args.data_dir else input_csv.parent
    frame = data.read_csv_file(input_csv, required=("paper_id", "question", "image"))
    original_names = {canonical: column for column, canonical in data.column_renames(
        pd.read_csv(input_csv, nrows=0).columns).items()}
    if "answer" in frame.columns:
        report = data.validate_rows(frame, data_dir)
    else:
        # validate_rows skips rows with an empty answer, which every row of a question-only CSV has.
        report = data.validate_rows(frame.assign(answer="unanswered"), data_dir)
        report.rows["answer"] = ""
    rows = data.report_problems(report, str(input_csv), strict=False)
    if len(rows) == 0:
        raise UsageError(
            f"no row of {input_csv} can be answered; images are looked up as <data_dir>/<paper_id>/<Image> "
            f"with --data_dir {data_dir}, so pass the folder that contains the paper folders"
        )

    captions = list(rows["caption"]) if "caption" in rows.columns else None
    has_answers = bool((rows["answer"] != "").any())
    answers = rows["answer"]
    if predictor.model_args.get("normalize_answers", False):
        # The label map contains normalised answers, so the gold answers must be normalised to match.
        answers = answers.map(data.normalize_answer)
    labels = data.encode_labels(answers, predictor.label_map) if has_answers else [-1] * len(rows)
    image_cache = None if args.no_image_cache else data.ImageCache(
        args.cache_dir or Path.home() / ".cache" / "spiqa" / "images", predictor.image_settings
    )
    dataset = data.QuestionImageDataset(
        rows["image_path"], predictor.encode(list(rows["question"]), captions),
        predictor.paper_indices(rows["paper_id"]), labels, predictor.image_settings, image_cache=image_cache,
    )
    loader = DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.num_workers,
        collate_fn=data.BatchCollator(predictor.tokenizer.pad_token_id or 0),
        pin_memory=predictor.device.type == "cuda",
    )

    results = []
    for batch in tqdm(loader, desc="predicting", unit="batch"):
        results.extend(predictor.predict_batch(batch, args.top_k))

    output = rows.drop(columns=["image_path", "csv_row"]).rename(columns=original_names)
    if "answer" not in original_names:
        output = output.drop(columns=["answer"])
    output["predicted_answer"] = [result["answer"] for result in results]
    output["confidence"] = [result["confidence"] for result in results]
    output["top_k"] = [json.dumps(result["top_k"], ensure_ascii=False) for result in results]
    with utils.atomic_path(args.output_csv) as temporary:
        output.to_csv(temporary, index=False)
    logger.info("wrote %d answers to %s", len(output), args.output_csv)

    if not has_answers:
        return None
    predictions = {row: (None, result["classes"], []) for row, result in enumerate(results)}
    metrics = utils.evaluation_metrics(predictions, rows, labels, predictor.index_to_answer, prefix="")
    metrics.pop("loss")
    utils.write_json(Path(f"{args.output_csv}.metrics.json"), metrics)
    for name, value in metrics.items():
        logger.info("%-22s %s", name, "n/a" if value is None else f"{value:.4f}")
    return metrics


INTERACTIVE_KEYS = ("paper_id", "image", "question")


def interactive(predictor, top_k):
    """Answer one JSON object per line of standard input ({"paper_id", "image", "question"}),
    printing one JSON result per line; invalid lines print {"error": ...} and the loop goes on.

    Image paths are read as given, relative to the current directory.
    """
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            missing = [key for key in INTERACTIVE_KEYS if not isinstance(request, dict) or key not in request]
            if missing:
                raise UsageError(f"missing key(s) {', '.join(missing)}; each line needs paper_id, image and question")
            result = predictor.answer(
                request["paper_id"], request["image"], request["question"], request.get("caption", ""), top_k,
                names=JSON_KEY_NAMES,
            )
        except json.JSONDecodeError as error:
            result = {"error": f"the line is not valid JSON: {error}"}
        except (TypeError, UsageError) as error:
            result = {"error": str(error)}
        if "error" in result:
            logger.warning("rejected input line: %s", result["error"])
        print(json.dumps(result, ensure_ascii=False), flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Answer questions about paper figures with a trained SPIQA classifier.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint_dir", default="runs/spiqa", help="run directory written by train.py")
    parser.add_argument("--paper_id", help="paper id, for example 1611.04684v1")
    parser.add_argument("--image", help="path of the figure or table image")
    parser.add_argument("--question", help="question about the image")
    parser.add_argument("--caption", default="", help="figure caption, used when the run was trained with --use_caption")
    parser.add_argument("--top_k", type=int, default=5, help="number of ranked answers to report")
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device index (default: GPU 0 if present, else the CPU)")
    parser.add_argument("--mixed_precision", action="store_true", help="float16 autocast on CUDA, bfloat16 on a CPU")
    parser.add_argument("--weights", choices=("best", "last"), default="best", help="best checkpoint or the last epoch's")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object: answer, confidence, top_k")
    parser.add_argument("--input_csv", help="answer every row of a CSV in the training format (Answer optional)")
    parser.add_argument("--output_csv", help="where --input_csv answers go")
    parser.add_argument("--data_dir", default=None, help="image root for --input_csv (default: the CSV's folder)")
    parser.add_argument("--batch_size", type=int, default=32, help="questions per batch with --input_csv")
    parser.add_argument("--num_workers", type=int, default=2, help="data loader workers with --input_csv")
    parser.add_argument("--cache_dir", default=None, help="preprocessed image cache (default: ~/.cache/spiqa/images)")
    parser.add_argument("--no_image_cache", action="store_true", help="decode images without the cache")
    parser.add_argument("--interactive", action="store_true", help="read JSON questions from standard input, one per line")
    args = parser.parse_args(argv)

    if args.top_k < 1:
        raise UsageError(f"--top_k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UsageError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.input_csv and not args.output_csv:
        raise UsageError("--input_csv needs --output_csv for the answers")
    if not args.input_csv and not args.interactive:
        missing = [f"--{name}" for name in ("paper_id", "image", "question") if getattr(args, name) is None]
        if missing:
            raise UsageError(f"missing {', '.join(missing)}; give all three, or use --input_csv or --interactive")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        utils.setup_logging(level=logging.WARNING if args.json else logging.INFO)
        device = utils.select_device(args.gpu)
        if not args.input_csv and not args.interactive:
            check_question_inputs(args.paper_id, args.image, args.question)
        predictor = Predictor(args.checkpoint_dir, device, args.mixed_precision, args.weights)
        if args.caption and not predictor.use_caption:
            logger.warning("--caption is ignored: %s was trained without --use_caption", args.checkpoint_dir)
        top_k = min(args.top_k, len(predictor.label_map))

        if args.input_csv:
            predict_csv(predictor, args)
        elif args.interactive:
            interactive(predictor, top_k)
        else:
            result = predictor.answer(args.paper_id, args.image, args.question, args.caption, top_k)
            if args.json:
                print(json.dumps(result, ensure_ascii=False))
            else:
                print(f"answer: {result['answer']}")
                print(f"confidence: {result['confidence']:.4f}")
                for rank, candidate in enumerate(result["top_k"], start=1):
                    print(f"  {rank}. {candidate['probability']:.4f}  {candidate['answer']}")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
