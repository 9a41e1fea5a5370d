"""Validation measures, baselines, the recorded split, metrics.jsonl, curves and batch prediction."""

import json
import sys

import pandas as pd
import pytest
from PIL import Image

import utils
from conftest import DATA_DIR, run_script
from predict import Predictor
from train import baseline_metrics

METRIC_KEYS = {
    "epoch", "train_loss", "val_loss", "val_accuracy", "val_top5_accuracy", "val_answerable_fraction",
    "val_accuracy_answerable", "val_rouge_l", "val_bleu", "val_exact_match",
}


def test_text_metrics_identical_strings():
    metrics = utils.text_metrics(["the loss drops after epoch 3"], ["the loss drops after epoch 3"])
    assert metrics["rouge_l"] == pytest.approx(1.0)
    assert metrics["bleu"] == pytest.approx(100.0)
    assert metrics["exact_match"] == 1.0


def test_text_metrics_disjoint_strings():
    metrics = utils.text_metrics(["accuracy improves"], ["bandwidth halves quickly"])
    assert metrics["rouge_l"] == 0.0
    assert metrics["bleu"] == 0.0
    assert metrics["exact_match"] == 0.0


def test_rouge_l_partial_overlap():
    # LCS 3 of a 3-token prediction and a 6-token reference: precision 1, recall 1/2, F = 2/3.
    metrics = utils.text_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert metrics["rouge_l"] == pytest.approx(2 / 3)


def test_bleu_partial_overlap():
    # n-gram precisions 4/5, 3/4, 2/3 and 1/2 with no brevity penalty: (0.2) ** 0.25 * 100.
    metrics = utils.text_metrics(["a b c d e"], ["a b c d f"])
    assert metrics["bleu"] == pytest.approx(100 * 0.2 ** 0.25, abs=0.01)


def test_exact_match_normalisation():
    assert utils.normalize_for_exact_match("  The Model, clearly!  ") == "model clearly"
    assert utils.text_metrics(["An answer."], ["answer"])["exact_match"] == 1.0


def test_evaluation_metrics_hand_case():
    rows = pd.DataFrame({"answer": ["yes", "no", "a long unseen answer"]})
    labels = [0, 1, -1]
    index_to_answer = {0: "yes", 1: "no", 2: "maybe"}
    predictions = {0: (0.1, [0, 1, 2], []), 1: (2.0, [2, 1, 0], []), 2: (None, [1, 0, 2], [])}
    metrics = utils.evaluation_metrics(predictions, rows, labels, index_to_answer)
    assert metrics["val_loss"] == pytest.approx(1.05)
    assert metrics["val_accuracy"] == pytest.approx(1 / 3)
    assert metrics["val_top5_accuracy"] == pytest.approx(2 / 3)
    assert metrics["val_answerable_fraction"] == pytest.approx(2 / 3)
    assert metrics["val_accuracy_answerable"] == pytest.approx(1 / 2)
    assert metrics["val_exact_match"] == pytest.approx(1 / 3)


def test_baselines_hand_case():
    train_rows = pd.DataFrame({"paper_id": ["p1", "p1", "p1", "p2", "p2"], "answer": ["x", "x", "y", "z", "z"]})
    val_rows = pd.DataFrame({"paper_id": ["p1", "p2", "p3"], "answer": ["x", "z", "x"]})
    baselines = baseline_metrics(train_rows, val_rows, {"x": 0, "y": 1, "z": 2})
    assert baselines["most_frequent_answer"]["accuracy"] == pytest.approx(2 / 3)
    assert baselines["paper_most_frequent_answer"]["accuracy"] == pytest.approx(1.0)


def test_split_recorded_same_for_one_and_two_processes(trained_run, torchrun_run):
    single = json.loads((trained_run / "split.json").read_text())
    double = json.loads((torchrun_run / "split.json").read_text())
    assert single["validation"] == double["validation"]
    assert single["train"] == double["train"]


def test_split_recorded_covers_every_row_once(trained_run):
    split = json.loads((trained_run / "split.json").read_text())
    assert set(split["train"]).isdisjoint(split["validation"])
    assert sorted(split["train"] + split["validation"]) == list(range(1, 667))
    assert len(split["validation"]) == round(0.2 * 666)


def test_metrics_jsonl_one_line_per_epoch(trained_run):
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for epoch, line in enumerate(lines, start=1):
        row = json.loads(line)
        assert row["epoch"] == epoch
        assert METRIC_KEYS <= set(row), METRIC_KEYS - set(row)


def test_best_checkpoint_follows_select_metric(trained_run):
    history = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((trained_run / "final_metrics.json").read_text())
    best = min(history, key=lambda row: row["val_loss"])
    assert final["select_metric"] == "val_loss"
    assert final["best_epoch"] == best["epoch"]


def test_baselines_written(trained_run):
    baselines = json.loads((trained_run / "baselines.json").read_text())
    assert set(baselines) == {"most_frequent_answer", "paper_most_frequent_answer"}
    for figures in baselines.values():
        assert {"accuracy", "rouge_l", "bleu", "exact_match"} <= set(figures)


def test_training_curves_png_size(trained_run):
    with Image.open(trained_run / "training_curves.png") as image:
        assert image.format == "PNG"
        assert image.size == (1500, 450)


def test_batch_prediction_matches_single(trained_run, tmp_path):
    rows = pd.read_csv(DATA_DIR / "training_data.csv", dtype=str, keep_default_na=False).iloc[100:120]
    input_csv = tmp_path / "twenty.csv"
    rows.to_csv(input_csv, index=False)
    output_csv = tmp_path / "answers.csv"
    result = run_script([sys.executable, "predict.py", "--checkpoint_dir", str(trained_run), "--input_csv",
                         str(input_csv), "--output_csv", str(output_csv), "--data_dir", str(DATA_DIR),
                         "--num_workers", "0", "--batch_size", "8"])
    output = pd.read_csv(output_csv, dtype=str, keep_default_na=False)
    assert len(output) == 20
    assert output["Question"].tolist() == rows["Question"].tolist()
    assert {"predicted_answer", "confidence", "top_k"} <= set(output.columns)
    assert "rouge_l" in result.stderr

    import torch

    predictor = Predictor(trained_run, torch.device("cpu"))
    for row, batch_answer in zip(rows.itertuples(index=False), output["predicted_answer"]):
        single = predictor.answer(row.paper_id, DATA_DIR / row.paper_id / row.Image, row.Question)
        assert single["answer"] == batch_answer

    first = rows.iloc[0]
    process = run_script([sys.executable, "predict.py", "--checkpoint_dir", str(trained_run), "--paper_id",
                          first["paper_id"], "--image", str(DATA_DIR / first["paper_id"] / first["Image"]),
                          "--question", first["Question"], "--json"])
    assert json.loads(process.stdout)["answer"] == output["predicted_answer"].iloc[0]

    metrics = json.loads((tmp_path / "answers.csv.metrics.json").read_text())
    assert set(metrics) >= {"accuracy", "top5_accuracy", "rouge_l", "bleu", "exact_match"}
