"""The fast paths give the plain paths' results, frozen training keeps the encoders, and the benchmark runs."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

import dataset as data
from conftest import DATA_DIR, run_script, train_command
from model import build_model

ROW_COUNT = 6


@pytest.fixture(scope="module")
def inputs(offline_models):
    """Return the first rows of the shipped data with the offline tokenizer, settings and vocabularies."""
    vision_dir, text_dir = offline_models
    rows = data.load_rows(DATA_DIR).iloc[:ROW_COUNT]
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    return {
        "rows": rows,
        "tokenizer": tokenizer,
        "settings": data.ImageSettings.from_pretrained(vision_dir),
        "label_map": data.build_label_map(rows["answer"]),
        "paper_vocab": data.build_paper_vocab(rows["paper_id"]),
    }


def make_model(offline_models, inputs, attn_implementation="sdpa"):
    vision_dir, text_dir = offline_models
    model_args = {
        "vision_model": vision_dir,
        "text_model": text_dir,
        "num_classes": len(inputs["label_map"]),
        "num_papers": len(inputs["paper_vocab"]),
        "image_settings": inputs["settings"].to_dict(),
        "attn_implementation": attn_implementation,
    }
    torch.manual_seed(0)
    return build_model(model_args, pretrained=True).eval()


def make_batch(inputs, image_cache=None, pad_to=None):
    rows = inputs["rows"]
    dataset = data.QuestionImageDataset(
        rows["image_path"],
        data.tokenize_questions(inputs["tokenizer"], list(rows["question"])),
        [data.paper_index(inputs["paper_vocab"], paper_id) for paper_id in rows["paper_id"]],
        data.encode_labels(rows["answer"], inputs["label_map"]),
        inputs["settings"],
        image_cache=image_cache,
    )
    collator = data.BatchCollator(inputs["tokenizer"].pad_token_id, pad_to=pad_to)
    return collator([dataset[index] for index in range(len(dataset))])


@torch.no_grad()
def logits_of(model, batch):
    names = ("paper_ids", "pixel_values", "input_ids", "attention_mask", "token_type_ids")
    return model(**{name: batch[name] for name in names})


def test_dynamic_padding_matches_pad_to_128(offline_models, inputs):
    model = make_model(offline_models, inputs)
    dynamic = make_batch(inputs)
    fixed = make_batch(inputs, pad_to=128)

    assert dynamic["input_ids"].shape[1] < 128
    assert fixed["input_ids"].shape[1] == 128
    torch.testing.assert_close(logits_of(model, dynamic), logits_of(model, fixed), rtol=1e-5, atol=1e-5)


def test_cached_image_matches_decoded(offline_models, inputs, tmp_path):
    model = make_model(offline_models, inputs)
    image_cache = data.ImageCache(tmp_path / "cache", inputs["settings"])
    decoded = make_batch(inputs)
    cold = make_batch(inputs, image_cache=image_cache)
    warm = make_batch(inputs, image_cache=image_cache)

    assert len(list((tmp_path / "cache").glob("*.npy"))) == inputs["rows"]["image_path"].nunique()
    assert torch.equal(cold["pixel_values"], decoded["pixel_values"])
    assert torch.equal(warm["pixel_values"], decoded["pixel_values"])
    torch.testing.assert_close(logits_of(model, warm), logits_of(model, decoded), rtol=0, atol=0)


def test_sdpa_matches_eager(offline_models, inputs):
    sdpa = make_model(offline_models, inputs, "sdpa")
    eager = make_model(offline_models, inputs, "eager")
    eager.load_state_dict(sdpa.state_dict())
    batch = make_batch(inputs, pad_to=128)

    assert sdpa.text_encoder.config._attn_implementation == "sdpa"
    assert eager.text_encoder.config._attn_implementation == "eager"
    torch.testing.assert_close(logits_of(sdpa, batch), logits_of(eager, batch), rtol=1e-4, atol=1e-5)


def test_image_cache_misses_after_rewrite(inputs, tmp_path):
    image_path = tmp_path / "figure.png"
    shutil.copyfile(inputs["rows"]["image_path"].iloc[0], image_path)
    image_cache = data.ImageCache(tmp_path / "cache", inputs["settings"])
    before = image_cache.load(image_path)

    with Image.open(image_path) as image:
        pixels = 255 - np.asarray(image.convert("RGB"))
    Image.fromarray(pixels).save(image_path)
    after = image_cache.load(image_path)
    decoded = data.load_image_uint8(image_path, inputs["settings"])

    assert not torch.equal(after, before)
    assert torch.equal(after, decoded)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_frozen_training_keeps_encoders(offline_models, image_cache_dir, tmp_path):
    vision_dir, text_dir = offline_models
    run_dir = tmp_path / "run"
    run_script(train_command(
        offline_models, run_dir, image_cache_dir, "--freeze_encoders", "--max_samples", "12", "--epochs", "2",
        "--batch_size", "4", "--val_fraction", "0.25", "--learning_rate", "1e-2",
    ))
    trained = load_file(str(run_dir / "last.safetensors"))
    # Loading through transformers maps the checkpoint's key names to the module names train.py saves.
    encoders = {"vision_encoder.": AutoModel.from_pretrained(vision_dir), "text_encoder.": AutoModel.from_pretrained(text_dir)}

    for prefix, encoder in encoders.items():
        for name, tensor in encoder.state_dict().items():
            assert torch.equal(trained[prefix + name], tensor), f"{prefix + name} changed"
    config = json.loads((run_dir / "run_config.json").read_text())
    torch.manual_seed(config["args"]["seed"])
    initial_model = build_model(config["model"], pretrained=True)
    for name, tensor in initial_model.head.state_dict().items():
        assert not torch.equal(trained[f"head.{name}"], tensor), f"head.{name} did not change"


def test_benchmark_quick_tiny_runs(tmp_path):
    output = tmp_path / "results.jsonl"
    result = run_script([
        sys.executable, "benchmarks/run.py", "--quick", "--tiny", "--work_dir", str(tmp_path / "work"),
        "--output", str(output), "--batch_size", "4", "--load_rows", "8", "--warmup_steps", "0",
        "--train_steps", "1", "--feature_rows", "8", "--head_epochs", "1", "--predict_rows", "4",
        "--single_predictions", "1",
    ])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    sections = {row["section"] for row in rows}

    assert "speed-up" in result.stdout
    assert sections == {"a data loading", "b training step", "c epoch", "d prediction"}
    assert len(rows) == 11
    for row in rows:
        assert row["value"] > 0, row
        assert row["peak_rss_mib"] > 0, row
