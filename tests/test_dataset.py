"""Reading the training CSV, the label map, the paper vocabulary, splits and image preprocessing."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor

import dataset as data
from conftest import DATA_DIR
from model import build_model
from utils import UsageError


def test_shipped_csv_row_count():
    frame = data.read_csv_file(DATA_DIR / data.CSV_NAME)
    assert len(frame) == 666
    assert frame["paper_id"].nunique() == 118


def test_shipped_csv_keeps_multiline_answers():
    frame = data.read_csv_file(DATA_DIR / data.CSV_NAME)
    multiline = frame[frame["answer"].str.contains("\n")]
    assert len(multiline) > 0
    assert all(paper_id.strip() for paper_id in multiline["paper_id"])
    assert all(image.endswith(".png") for image in multiline["image"])


def test_shipped_rows_all_valid():
    rows = data.load_rows(DATA_DIR)
    assert len(rows) == 666
    assert all(path.endswith(".png") for path in rows["image_path"])


def test_csv_quoted_commas_quotes_newlines(tmp_path):
    csv_path = tmp_path / "questions.csv"
    answer = 'First line, with a comma\nand a "quoted" second line'
    pd.DataFrame({"paper_id": ["p1"], "Question": ["q?"], "Answer": [answer], "Image": ["a.png"]}).to_csv(
        csv_path, index=False
    )
    frame = data.read_csv_file(csv_path)
    assert frame["answer"].tolist() == [answer]


def test_csv_lower_case_columns(tmp_path):
    csv_path = tmp_path / "questions.csv"
    csv_path.write_text("paper_id,question,answer,image_name\np1,What?,Yes,a.png\n", encoding="utf-8")
    frame = data.read_csv_file(csv_path)
    assert list(frame.columns) == ["paper_id", "question", "answer", "image"]
    assert frame.iloc[0].tolist() == ["p1", "What?", "Yes", "a.png"]


def test_csv_missing_column_names_found_columns(tmp_path):
    csv_path = tmp_path / "questions.csv"
    csv_path.write_text("paper_id,Question,Image\np1,What?,a.png\n", encoding="utf-8")
    with pytest.raises(UsageError, match="missing the column\\(s\\) answer; found: paper_id, Question, Image"):
        data.read_csv_file(csv_path)


def test_label_map_order_is_stable():
    answers = ["b", "a", "c", "a", "b", "a"]
    label_map = data.build_label_map(answers)
    assert label_map == {"a": 0, "b": 1, "c": 2}
    assert data.build_label_map(list(reversed(answers))) == label_map


def test_label_map_min_count_and_other():
    answers = ["yes", "yes", "no", "maybe"]
    assert data.build_label_map(answers, min_count=2) == {"yes": 0}
    with_other = data.build_label_map(answers, min_count=2, rare_answers="other")
    assert with_other == {"yes": 0, data.OTHER_ANSWER: 1}
    assert data.encode_labels(["yes", "no"], with_other) == [0, 1]
    assert data.encode_labels(["yes", "no"], {"yes": 0}) == [0, -1]


def test_label_map_max_classes():
    label_map = data.build_label_map(["x", "x", "y", "y", "y", "z"], max_classes=2)
    assert label_map == {"y": 0, "x": 1}


def test_paper_vocab_reserves_unknown_index():
    vocab = data.build_paper_vocab(["1611.04684v1", "1603.00286v5", "1611.04684v1"])
    assert vocab == {data.UNKNOWN_PAPER: 0, "1603.00286v5": 1, "1611.04684v1": 2}
    assert data.paper_index(vocab, "1611.04684v1") == 2
    assert data.paper_index(vocab, "2401.00001v1") == 0


def test_split_is_reproducible_and_disjoint():
    rows = data.read_csv_file(DATA_DIR / data.CSV_NAME)
    train_a, val_a = data.split_rows(rows, 0.2, seed=7)
    train_b, val_b = data.split_rows(rows, 0.2, seed=7)
    _, val_c = data.split_rows(rows, 0.2, seed=8)
    assert np.array_equal(val_a, val_b)
    assert np.array_equal(train_a, train_b)
    assert not np.array_equal(val_a, val_c)
    assert set(train_a).isdisjoint(val_a)
    assert sorted(set(train_a) | set(val_a)) == list(range(len(rows)))
    assert len(val_a) == round(0.2 * len(rows))


def test_split_by_paper_keeps_papers_apart():
    rows = data.read_csv_file(DATA_DIR / data.CSV_NAME)
    train, val = data.split_rows(rows, 0.25, seed=3, split_by="paper")
    train_papers = set(rows["paper_id"].iloc[train])
    val_papers = set(rows["paper_id"].iloc[val])
    assert train_papers.isdisjoint(val_papers)
    assert len(train) + len(val) == len(rows)


def test_split_zero_fraction_keeps_all_rows():
    rows = data.read_csv_file(DATA_DIR / data.CSV_NAME)
    train, val = data.split_rows(rows, 0.0, seed=1)
    assert len(train) == len(rows)
    assert len(val) == 0


def test_image_settings_read_from_processor_config(tmp_path):
    processor = ViTImageProcessor(
        size={"height": 64, "width": 48}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], resample=3
    )
    processor.save_pretrained(tmp_path)
    settings = data.ImageSettings.from_pretrained(tmp_path)
    assert (settings.height, settings.width) == (64, 48)
    assert settings.image_mean == (0.1, 0.2, 0.3)
    assert settings.image_std == (0.4, 0.5, 0.6)
    assert settings.resample == 3


def test_preprocessing_matches_image_processor(offline_models):
    vision_dir, _ = offline_models
    processor = ViTImageProcessor.from_pretrained(vision_dir)
    settings = data.ImageSettings.from_processor(processor)
    image_path = DATA_DIR / "1611.04684v1" / "1611.04684v1-Table5-1.png"

    pixels = data.load_image_uint8(image_path, settings)
    expected = processor(Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]

    model_args = {
        "vision_model": vision_dir,
        "text_model": offline_models[1],
        "num_classes": 2,
        "num_papers": 2,
        "image_settings": settings.to_dict(),
    }
    model = build_model(model_args)
    normalized = model.normalize_pixels(pixels.unsqueeze(0))

    assert pixels.dtype == torch.uint8
    assert tuple(pixels.shape) == (3, 224, 224)
    # The processor rounds some resized pixels the other way: at most one uint8 level, 2/255 after normalisation.
    difference = (normalized - expected).abs()
    assert difference.max().item() <= 2 / 255 + 1e-6
    assert (difference > 1e-5).float().mean().item() < 0.01


def test_collator_pads_to_longest_question():
    items = []
    for length in (3, 5):
        items.append({
            "pixel_values": torch.zeros(3, 4, 4, dtype=torch.uint8),
            "input_ids": torch.arange(1, length + 1),
            "token_type_ids": torch.zeros(length, dtype=torch.long),
            "paper_ids": torch.tensor(1),
            "labels": torch.tensor(0),
            "rows": torch.tensor(0),
        })
    batch = data.BatchCollator(pad_token_id=0)(items)
    assert tuple(batch["input_ids"].shape) == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0]


def test_questions_truncated_at_128_tokens(offline_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(offline_models[1])
    long_question = " ".join(["figure"] * 400)
    (input_ids, token_type_ids), = data.tokenize_questions(tokenizer, [long_question])
    assert len(input_ids) == data.MAX_QUESTION_TOKENS
    assert input_ids[-1] == tokenizer.sep_token_id
    assert len(token_type_ids) == data.MAX_QUESTION_TOKENS


def test_encoded_questions_match_tokenizer(offline_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(offline_models[1])
    rows = data.read_csv_file(DATA_DIR / data.CSV_NAME).iloc[:50]
    captions = ["" if position % 3 == 0 else answer for position, answer in enumerate(rows["answer"])]
    expected = data.tokenize_questions(tokenizer, list(rows["question"]), captions)
    packed = data.EncodedQuestions(tokenizer, rows["question"], captions, chunk_size=7)

    assert len(packed) == 50
    for position, (input_ids, token_type_ids) in enumerate(expected):
        assert packed[position][0].tolist() == input_ids
        assert packed[position][1].tolist() == token_type_ids
    assert packed[0][0].dtype == np.int32
