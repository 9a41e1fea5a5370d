"""Training and prediction end to end: one process, torchrun, the deprecated launcher, and overfitting."""

import json
import sys

import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import DATA_DIR, run_script, train_command

QUESTION_ROW = 2  # A table question of paper 1611.04684v1 in the shipped CSV.


def predict_json(run_dir, row, *extra):
    """Run predict.py --json on one row of the shipped CSV and return the parsed output."""
    command = [
        sys.executable, "predict.py",
        "--checkpoint_dir", str(run_dir),
        "--paper_id", row["paper_id"],
        "--image", str(DATA_DIR / row["paper_id"] / row["Image"]),
        "--question", row["Question"],
        "--json", *extra,
    ]
    result = run_script(command)
    return json.loads(result.stdout), result


@pytest.fixture(scope="module")
def shipped_rows():
    return pd.read_csv(DATA_DIR / "training_data.csv", dtype=str, keep_default_na=False)


def test_run_directory_contents(trained_run):
    for name in ("model.safetensors", "last.safetensors", "label_map.json", "paper_vocab.json", "run_config.json",
                 "training_state.pt", "split.json", "tokenizer/tokenizer.json", "image_processor/preprocessor_config.json"):
        assert (trained_run / name).is_file(), name


def test_weights_have_no_module_prefix(torchrun_run):
    names = load_file(str(torchrun_run / "model.safetensors")).keys()
    assert not any(name.startswith("module.") for name in names)
    assert "head.layers.6.weight" in names


def test_head_widths_follow_encoder_configs(trained_run):
    config = json.loads((trained_run / "run_config.json").read_text())["model"]
    weights = load_file(str(trained_run / "model.safetensors"))
    fused = config["vision_config"]["hidden_size"] + config["text_config"]["hidden_size"] + 64
    assert tuple(weights["head.layers.0.weight"].shape) == (512, fused)
    assert tuple(weights["head.layers.3.weight"].shape) == (512, 512)
    assert tuple(weights["head.layers.6.weight"].shape) == (config["num_classes"], 512)
    assert tuple(weights["paper_embedding.weight"].shape) == (config["num_papers"], 64)


def test_predict_answer_in_label_map(trained_run, shipped_rows):
    output, _ = predict_json(trained_run, shipped_rows.iloc[QUESTION_ROW])
    label_map = json.loads((trained_run / "label_map.json").read_text())
    assert set(output) == {"answer", "confidence", "top_k"}
    assert output["answer"] in label_map
    assert len(output["top_k"]) == 5
    assert output["top_k"][0]["answer"] == output["answer"]
    assert 0 < output["confidence"] <= 1


def test_predict_unknown_paper_logs_reserved_index(trained_run, shipped_rows):
    row = shipped_rows.iloc[QUESTION_ROW].copy()
    row["paper_id"] = "2412.99999v1"
    command = [
        sys.executable, "predict.py", "--checkpoint_dir", str(trained_run), "--paper_id", row["paper_id"],
        "--image", str(DATA_DIR / "1611.04684v1" / row["Image"]), "--question", row["Question"], "--json",
    ]
    result = run_script(command)
    assert json.loads(result.stdout)["answer"]
    assert "2412.99999v1 was not seen in training" in result.stderr


def test_torchrun_run_loads_in_predict(torchrun_run, shipped_rows):
    output, _ = predict_json(torchrun_run, shipped_rows.iloc[QUESTION_ROW])
    label_map = json.loads((torchrun_run / "label_map.json").read_text())
    assert output["answer"] in label_map


def test_deprecated_launcher_run_loads(offline_models, image_cache_dir, tmp_path, shipped_rows):
    launcher = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2"]
    command = train_command(offline_models, tmp_path / "run", image_cache_dir, "--epochs", "1", "--max_samples", "32",
                            "--batch_size", "4", "--multi_gpu", launcher=launcher)
    run_script(command)
    output, _ = predict_json(tmp_path / "run", shipped_rows.iloc[QUESTION_ROW])
    assert output["answer"] in json.loads((tmp_path / "run" / "label_map.json").read_text())


def test_two_processes_match_one_after_a_step(offline_models, image_cache_dir, tmp_path):
    common = ("--max_samples", "16", "--val_fraction", "0", "--max_steps", "1", "--epochs", "1",
              "--dropout", "0", "--paper_dropout", "0", "--learning_rate", "1e-3", "--seed", "5")
    run_script(train_command(offline_models, tmp_path / "one", image_cache_dir, "--batch_size", "8", *common))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_script(train_command(offline_models, tmp_path / "two", image_cache_dir, "--batch_size", "4", "--multi_gpu",
                             *common, launcher=launcher))

    one = load_file(str(tmp_path / "one" / "last.safetensors"))
    two = load_file(str(tmp_path / "two" / "last.safetensors"))
    initial_head = None
    # AdamW's first update moves each weight by about the learning rate (1e-3) times the sign of its
    # gradient, so a gradient that differs only by float rounding near zero can move a weight by a
    # fraction of 1e-3. A wrong shard or unsynchronised gradients move many weights by the full 1e-3.
    for name, tensor in one.items():
        assert (tensor - two[name]).abs().max().item() < 2e-4, name
        if name == "head.layers.6.weight":
            initial_head = tensor

    loss_one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    loss_two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    assert initial_head is not None


def test_overfits_eight_questions(offline_models, image_cache_dir, tmp_path, shipped_rows):
    run_dir = tmp_path / "run"
    run_script(train_command(
        offline_models, run_dir, image_cache_dir, "--max_samples", "8", "--val_fraction", "0", "--epochs", "50",
        "--batch_size", "4", "--learning_rate", "2e-3", "--paper_dropout", "0",
    ))
    first_rows = shipped_rows.iloc[:8]
    input_csv = tmp_path / "eight.csv"
    first_rows.to_csv(input_csv, index=False)
    output_csv = tmp_path / "answers.csv"
    run_script([sys.executable, "predict.py", "--checkpoint_dir", str(run_dir), "--input_csv", str(input_csv),
                "--output_csv", str(output_csv), "--data_dir", str(DATA_DIR), "--num_workers", "0"])

    answers = pd.read_csv(output_csv, dtype=str, keep_default_na=False)
    assert answers["predicted_answer"].tolist() == first_rows["Answer"].tolist()

    single, _ = predict_json(run_dir, first_rows.iloc[3])
    assert single["answer"] == first_rows.iloc[3]["Answer"]
