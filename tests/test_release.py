"""Training on SPIQA's release format: JSON splits, captions, vocabulary options and layouts."""

import csv
import json
import sys
from collections import Counter

import pandas as pd
import pytest
import torch
from PIL import Image

import dataset as data
import train
import utils
from conftest import DATA_DIR, run_script
from model import build_model

PAPERS = ("2101.00001v1", "2101.00002v1", "2101.00003v1", "2101.00004v1")
ANSWERS = ("Yes.", "yes", "No", "Table 1", "The baseline", "Higher accuracy")
MISSING_FIGURE = "2101.00004v1-Figure9-1.png"
UNLISTED_FIGURE = "2101.00002v1-Figure7-1.png"


def figure_names(paper_id):
    return [f"{paper_id}-Figure1-1.png", f"{paper_id}-Figure2-1.png", f"{paper_id}-Table1-1.png"]


def release_content():
    """Return the fixture's papers in the release layout, before any file is written."""
    release = {}
    for paper_number, paper_id in enumerate(PAPERS):
        all_figures = {}
        for figure_number, name in enumerate(figure_names(paper_id)):
            is_table = "Table" in name
            all_figures[name] = {
                "caption": f"{'Table' if is_table else 'Figure'} {figure_number + 1}: accuracy of model {paper_number} "
                           f"on benchmark {figure_number} compared with the baseline.",
                "content_type": "table" if is_table else "figure",
                "figure_type": "table" if is_table else "plot",
            }
        names = list(all_figures)
        qa = []
        for question_number in range(6):
            qa.append({
                "question": f"Does model {paper_number} beat the baseline in experiment {question_number}?",
                "answer": ANSWERS[(paper_number + question_number) % len(ANSWERS)],
                "explanation": "The figure shows it.",
                "reference": names[question_number % len(names)],
            })
        release[paper_id] = {"paper_id": paper_id, "all_figures": all_figures, "qa": qa}

    # A figure listed without its image file, and an image file whose figure is not listed.
    release[PAPERS[3]]["all_figures"][MISSING_FIGURE] = {"caption": "Lost figure.", "content_type": "figure", "figure_type": "plot"}
    release[PAPERS[3]]["qa"].append({"question": "What does the lost figure show?", "answer": "No", "explanation": "", "reference": MISSING_FIGURE})
    release[PAPERS[1]]["qa"].append({"question": "What does figure 7 plot?", "answer": "yes", "explanation": "", "reference": UNLISTED_FIGURE})
    return release


def expected_rows(release):
    """Return the question rows in file order as dicts, the figure caption or "" included."""
    rows = []
    for paper_id, paper in release.items():
        for item in paper["qa"]:
            figure = paper["all_figures"].get(item["reference"])
            rows.append({
                "paper_id": paper_id,
                "question": item["question"],
                "answer": item["answer"],
                "image": item["reference"],
                "caption": figure["caption"] if figure else "",
            })
    return rows


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """Write the fixture as SPIQA_train.json, SPIQA_val.json, a CSV twin and one image per figure."""
    root = tmp_path_factory.mktemp("spiqa_release")
    release = release_content()
    images_dir = root / "images"
    for number, (paper_id, paper) in enumerate(release.items()):
        (images_dir / paper_id).mkdir(parents=True)
        for figure_number, name in enumerate(list(paper["all_figures"]) + [UNLISTED_FIGURE]):
            if name == MISSING_FIGURE or not name.startswith(paper_id):
                continue
            color = (40 * number, 60 * figure_number, 200)
            Image.new("RGB", (48 + 8 * figure_number, 32), color).save(images_dir / paper_id / name)

    (root / "SPIQA_train.json").write_text(json.dumps(release), encoding="utf-8")
    val_release = {paper_id: release[paper_id] for paper_id in PAPERS[:2]}
    (root / "SPIQA_val.json").write_text(json.dumps(val_release), encoding="utf-8")

    with open(root / "train.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["paper_id", "Question", "Answer", "Image", "Caption"])
        for row in expected_rows(release):
            writer.writerow([row["paper_id"], row["question"], row["answer"], row["image"], row["caption"]])
    return root


def train_args(release_dir, offline_models, *extra):
    vision_dir, text_dir = offline_models
    return train.parse_args([
        "--train_file", str(release_dir / "SPIQA_train.json"),
        "--train_images_dir", str(release_dir / "images"),
        "--vision_model", vision_dir,
        "--text_model", text_dir,
        "--no_image_cache",
        *extra,
    ])


def release_train_command(release_dir, offline_models, output_dir, cache_dir, *extra):
    vision_dir, text_dir = offline_models
    return [
        sys.executable, "train.py",
        "--train_file", str(release_dir / "SPIQA_train.json"),
        "--train_images_dir", str(release_dir / "images"),
        "--vision_model", vision_dir,
        "--text_model", text_dir,
        "--output_dir", str(output_dir),
        "--cache_dir", str(cache_dir),
        "--num_workers", "0",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------
# Reading the release


def test_json_rows_match_release(release_dir):
    rows = data.read_release_json(release_dir / "SPIQA_train.json")
    expected = pd.DataFrame(expected_rows(release_content()))
    pd.testing.assert_frame_equal(rows, expected)


def test_json_and_csv_routes_equal(release_dir):
    images_dir = release_dir / "images"
    from_json = data.load_question_file(release_dir / "SPIQA_train.json", images_dir, image_check="full")
    from_csv = data.load_question_file(release_dir / "train.csv", images_dir, image_check="full")
    from_data_dir_route = data.load_rows(images_dir, csv_path=release_dir / "train.csv")
    pd.testing.assert_frame_equal(from_json, from_csv)
    pd.testing.assert_frame_equal(from_json, from_data_dir_route)


def test_missing_image_skipped(release_dir):
    rows = data.load_question_file(release_dir / "SPIQA_train.json", release_dir / "images", image_check="exists")
    assert len(rows) == len(expected_rows(release_content())) - 1
    assert MISSING_FIGURE not in set(rows["image"])


def test_missing_image_strict_rejected(release_dir):
    with pytest.raises(utils.UsageError, match="missing image"):
        data.load_question_file(release_dir / "SPIQA_train.json", release_dir / "images", strict=True)


def test_folder_listing_matches_validate_rows(release_dir, tmp_path):
    frame = data.read_release_json(release_dir / "SPIQA_train.json")
    frame.loc[0, "image"] = "../" + frame.loc[0, "image"]
    frame.loc[1, "paper_id"] = "no-such-paper"
    frame.loc[2, "question"] = " "
    slow = data.validate_rows(frame, release_dir / "images")
    fast = data.validate_rows_by_folder(frame, release_dir / "images")
    pd.testing.assert_frame_equal(fast.rows, slow.rows)
    assert [vars(problem) for problem in fast.problems] == [vars(problem) for problem in slow.problems]


def test_uncaptioned_figure_has_empty_caption(release_dir):
    rows = data.read_release_json(release_dir / "SPIQA_train.json")
    captions = dict(zip(rows["image"], rows["caption"]))
    assert captions[UNLISTED_FIGURE] == ""


def test_convert_spiqa_writes_csv(release_dir, tmp_path):
    output_csv = tmp_path / "converted.csv"
    result = run_script([sys.executable, "utils.py", "convert-spiqa", "--json_file", str(release_dir / "SPIQA_train.json"),
                         "--output_csv", str(output_csv)])
    converted = pd.read_csv(output_csv, dtype=str, keep_default_na=False)
    hand_written = pd.read_csv(release_dir / "train.csv", dtype=str, keep_default_na=False)
    assert list(converted.columns) == ["paper_id", "Question", "Answer", "Image", "Caption"]
    pd.testing.assert_frame_equal(converted, hand_written)
    assert f"wrote {len(hand_written)} questions" in result.stderr


# ---------------------------------------------------------------------------------------------
# Layouts that are not the train/val/test-A layout


TEST_B_PAPER = {
    "paper_id": "2101.00009v1",
    "all_figures_tables": {"2101.00009v1-Figure1-1.png": "A caption."},
    "question": ["What is shown?"],
    "composition": ["A plot."],
    "referred_figures_tables": [["2101.00009v1-Figure1-1.png"]],
}
TEST_C_PAPER = {
    "arxiv_id": "2101.00009",
    "figures_and_tables": [{"file": "2101.00009v1-Figure1-1.png", "caption": "A caption."}],
    "question": ["What is shown?"],
    "answer": [{"free_form_answer": "A plot.", "yes_no": None}],
    "referred_figures_tables": [["2101.00009v1-Figure1-1.png"]],
    "question_key": ["q1"],
}


@pytest.mark.parametrize(
    "content, message",
    [
        ({"2101.00009v1": TEST_B_PAPER}, "SPIQA test-B layout"),
        ({"2101.00009v1": TEST_C_PAPER}, "SPIQA test-C layout"),
        ([TEST_B_PAPER], "expected a JSON object that maps paper ids to papers"),
        ({"2101.00009v1": {"paper_id": "2101.00009v1", "qa": []}}, "not in the SPIQA train/val/test-A layout"),
    ],
    ids=["test-B", "test-C", "list", "no-figures"],
)
def test_other_layouts_rejected(tmp_path, offline_models, content, message):
    json_file = tmp_path / "split.json"
    json_file.write_text(json.dumps(content), encoding="utf-8")
    vision_dir, text_dir = offline_models
    commands = {
        "train.py": [sys.executable, "train.py", "--train_file", str(json_file), "--train_images_dir", str(tmp_path),
                     "--vision_model", vision_dir, "--text_model", text_dir, "--output_dir", str(tmp_path / "run")],
        "convert-spiqa": [sys.executable, "utils.py", "convert-spiqa", "--json_file", str(json_file),
                          "--output_csv", str(tmp_path / "out.csv")],
    }
    for name, command in commands.items():
        result = run_script(command, check=False)
        assert result.returncode == 2, f"{name}: {result.stderr}"
        assert message in result.stderr, name
        assert "Traceback" not in result.stderr, name


def test_train_file_needs_images_dir():
    with pytest.raises(utils.UsageError, match="--train_images_dir"):
        train.parse_args(["--train_file", "SPIQA_train.json"])


# ---------------------------------------------------------------------------------------------
# Splits and vocabulary


def test_paper_split_disjoint(release_dir, offline_models):
    args = train_args(release_dir, offline_models, "--split_by", "paper", "--val_fraction", "0.5")
    prepared = train.prepare_data(args, utils.DistributedContext())
    train_papers = set(prepared["train_rows"]["paper_id"])
    val_papers = set(prepared["val_rows"]["paper_id"])
    assert train_papers and val_papers
    assert not train_papers & val_papers
    assert len(prepared["train_rows"]) + len(prepared["val_rows"]) == len(prepared["rows"])


def test_val_file_replaces_split(release_dir, offline_models):
    args = train_args(release_dir, offline_models, "--val_file", str(release_dir / "SPIQA_val.json"))
    prepared = train.prepare_data(args, utils.DistributedContext())
    val_rows = data.load_question_file(release_dir / "SPIQA_val.json", release_dir / "images")
    assert len(prepared["train_rows"]) == len(prepared["rows"])
    assert list(prepared["val_rows"]["question"]) == list(val_rows["question"])


def test_data_dir_image_check_exists(offline_models):
    vision_dir, text_dir = offline_models
    common = ["--data_dir", str(DATA_DIR), "--vision_model", vision_dir, "--text_model", text_dir, "--no_image_cache"]
    default_args = train.parse_args(common)
    exists_args = train.parse_args(common + ["--image_check", "exists"])
    assert default_args.image_check == "full"
    default_rows, _ = train.read_rows(default_args)
    exists_rows, _ = train.read_rows(exists_args)
    pd.testing.assert_frame_equal(exists_rows, default_rows)


def test_vocabulary_counts_drop(release_dir, offline_models):
    args = train_args(release_dir, offline_models, "--val_fraction", "0.25", "--normalize_answers",
                      "--min_answer_count", "3", "--rare_answers", "drop")
    prepared = train.prepare_data(args, utils.DistributedContext())
    answers = [data.normalize_answer(row["answer"]) for row in expected_rows(release_content()) if row["image"] != MISSING_FIGURE]
    val_answers = list(prepared["val_rows"]["answer"])
    train_counts = Counter(answers) - Counter(val_answers)
    vocabulary_answers = {answer for answer, count in train_counts.items() if count >= 3}
    vocabulary = prepared["vocabulary"]
    assert set(prepared["label_map"]) == vocabulary_answers
    assert "yes" in prepared["label_map"]
    assert "Yes." not in prepared["label_map"]
    assert vocabulary["train_outside_questions"] == sum(count for answer, count in train_counts.items() if answer not in vocabulary_answers)
    assert vocabulary["val_outside_questions"] == sum(answer not in vocabulary_answers for answer in val_answers)
    assert len(prepared["train_rows"]) == sum(count for answer, count in train_counts.items() if answer in vocabulary_answers)


def test_vocabulary_counts_other(release_dir, offline_models):
    args = train_args(release_dir, offline_models, "--val_fraction", "0.25", "--max_classes", "2", "--rare_answers", "other")
    prepared = train.prepare_data(args, utils.DistributedContext())
    train_answers = list(prepared["train_rows"]["answer"])
    ranked = sorted(Counter(train_answers).items(), key=lambda item: (-item[1], item[0]))
    vocabulary_answers = {answer for answer, _ in ranked[:2]}
    assert set(prepared["label_map"]) == vocabulary_answers | {data.OTHER_ANSWER}
    assert prepared["vocabulary"]["train_outside_questions"] == sum(answer not in vocabulary_answers for answer in train_answers)
    assert prepared["vocabulary"]["train_outside_answers"] == len(set(train_answers) - vocabulary_answers)
    assert all(label >= 0 for label in prepared["train_dataset"].labels)


# ---------------------------------------------------------------------------------------------
# Captions


def test_use_caption_encodes_pair(release_dir, offline_models):
    args = train_args(release_dir, offline_models, "--use_caption", "--val_fraction", "0")
    prepared = train.prepare_data(args, utils.DistributedContext())
    tokenizer = prepared["tokenizer"]
    rows = prepared["train_rows"]
    dataset = prepared["train_dataset"]
    for index, row in rows.iterrows():
        if row["caption"]:
            expected = tokenizer(row["question"], row["caption"], truncation="only_second", max_length=128)
        else:
            expected = tokenizer(row["question"], truncation=True, max_length=128)
        item = dataset[index]
        assert item["input_ids"].tolist() == expected["input_ids"], row["question"]
        assert item["token_type_ids"].tolist() == expected["token_type_ids"], row["question"]
    assert (rows["caption"] == "").sum() == 1


def test_without_use_caption_question_alone(release_dir, offline_models):
    args = train_args(release_dir, offline_models, "--val_fraction", "0")
    prepared = train.prepare_data(args, utils.DistributedContext())
    question = prepared["train_rows"]["question"][0]
    expected = prepared["tokenizer"](question, truncation=True, max_length=128)["input_ids"]
    assert prepared["train_dataset"][0]["input_ids"].tolist() == expected


def test_use_caption_without_captions_off(offline_models):
    vision_dir, text_dir = offline_models
    args = train.parse_args(["--data_dir", str(DATA_DIR), "--vision_model", vision_dir, "--text_model", text_dir,
                             "--no_image_cache", "--use_caption", "--max_samples", "20"])
    prepared = train.prepare_data(args, utils.DistributedContext())
    question = prepared["train_rows"]["question"][0]
    expected = prepared["tokenizer"](question, truncation=True, max_length=128)["input_ids"]
    assert prepared["use_caption"] is False
    assert prepared["train_dataset"][0]["input_ids"].tolist() == expected


def test_long_caption_truncated_first(offline_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(offline_models[1])
    question = "Which model has the highest accuracy?"
    caption = " ".join(["accuracy of the proposed model on the benchmark"] * 40)
    input_ids, token_type_ids = data.tokenize_questions(tokenizer, [question], [caption])[0]
    question_ids = tokenizer(question)["input_ids"]
    assert len(input_ids) == data.MAX_QUESTION_TOKENS
    assert input_ids[: len(question_ids)] == question_ids
    assert token_type_ids.count(1) == data.MAX_QUESTION_TOKENS - len(question_ids)


def test_question_filling_budget_encodes(offline_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(offline_models[1])
    question = " ".join(["accuracy"] * 200)
    caption = "A short caption."
    input_ids, _ = data.tokenize_questions(tokenizer, [question], [caption])[0]
    expected = tokenizer(question, caption, truncation="longest_first", max_length=data.MAX_QUESTION_TOKENS)
    assert input_ids == expected["input_ids"]
    assert len(input_ids) == data.MAX_QUESTION_TOKENS


@pytest.fixture(scope="module")
def caption_run(release_dir, offline_models, tmp_path_factory):
    """Train one short run on the release fixture with --use_caption and return its directory."""
    output_dir = tmp_path_factory.mktemp("caption_run")
    cache_dir = tmp_path_factory.mktemp("caption_cache")
    command = release_train_command(
        release_dir, offline_models, output_dir, cache_dir, "--use_caption", "--split_by", "paper",
        "--normalize_answers", "--epochs", "2", "--batch_size", "4", "--learning_rate", "1e-3",
    )
    result = run_script(command)
    return output_dir, result


def test_caption_run_records_use_caption(caption_run):
    output_dir, _ = caption_run
    config = utils.read_json(output_dir / utils.RUN_CONFIG_NAME)
    assert config["model"]["use_caption"] is True


def test_caption_run_logs_vocabulary(caption_run):
    output_dir, result = caption_run
    vocabulary = utils.read_json(output_dir / "vocabulary.json")
    assert "answer vocabulary:" in result.stderr
    assert vocabulary["classes"] == len(utils.read_json(output_dir / utils.LABEL_MAP_NAME))


# predict.py and the reference below run the same float32 operations on one CPU, so they agree
# far more closely than this. The caption moves the tiny test model's probabilities by about 1e-6.
PROBABILITY_TOLERANCE = 1e-7


def reference_prediction(output_dir, paper_id, image_path, question, caption):
    """Return {answer: probability} from the run's weights, encoding the pair with the tokenizer directly."""
    from transformers import AutoTokenizer

    config = utils.read_json(output_dir / utils.RUN_CONFIG_NAME)["model"]
    model = build_model(config, pretrained=False)
    model.load_state_dict(utils.load_weights(output_dir / utils.WEIGHTS_NAME))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir / utils.TOKENIZER_DIR)
    label_map = utils.read_json(output_dir / utils.LABEL_MAP_NAME)
    paper_vocab = utils.read_json(output_dir / utils.PAPER_VOCAB_NAME)

    if caption:
        encoded = tokenizer(question, caption, truncation="only_second", max_length=128, return_tensors="pt")
    else:
        encoded = tokenizer(question, truncation=True, max_length=128, return_tensors="pt")
    settings = data.ImageSettings.from_dict(config["image_settings"])
    pixel_values = data.load_image_uint8(image_path, settings).unsqueeze(0)
    with torch.no_grad():
        logits = model(
            paper_ids=torch.tensor([paper_vocab.get(paper_id, 0)]),
            pixel_values=pixel_values,
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            token_type_ids=encoded["token_type_ids"],
        )
    probabilities = logits.softmax(dim=-1)[0].tolist()
    return {answer: probabilities[index] for answer, index in label_map.items()}


def top_answer(probabilities):
    return max(probabilities, key=probabilities.get)


def assert_same_probabilities(predicted_top_k, reference):
    predicted = {candidate["answer"]: candidate["probability"] for candidate in predicted_top_k}
    assert set(predicted) == set(reference)
    for answer, probability in reference.items():
        assert predicted[answer] == pytest.approx(probability, abs=PROBABILITY_TOLERANCE), answer


def caption_example(release_dir):
    row = next(row for row in expected_rows(release_content()) if row["caption"] and row["paper_id"] == PAPERS[0])
    image_path = release_dir / "images" / row["paper_id"] / row["image"]
    return row, image_path


def test_predict_caption_matches_model(caption_run, release_dir):
    output_dir, _ = caption_run
    row, image_path = caption_example(release_dir)
    reference = reference_prediction(output_dir, row["paper_id"], image_path, row["question"], row["caption"])
    result = run_script([
        sys.executable, "predict.py", "--checkpoint_dir", str(output_dir), "--paper_id", row["paper_id"],
        "--image", str(image_path), "--question", row["question"], "--caption", row["caption"], "--json",
        "--top_k", str(len(reference)),
    ])
    predicted = json.loads(result.stdout)
    assert predicted["answer"] == top_answer(reference)
    assert_same_probabilities(predicted["top_k"], reference)


def test_caption_changes_model_input(caption_run, release_dir):
    output_dir, _ = caption_run
    row, image_path = caption_example(release_dir)
    with_caption = reference_prediction(output_dir, row["paper_id"], image_path, row["question"], row["caption"])
    without_caption = reference_prediction(output_dir, row["paper_id"], image_path, row["question"], "")
    largest_change = max(abs(with_caption[answer] - without_caption[answer]) for answer in with_caption)
    assert largest_change > 10 * PROBABILITY_TOLERANCE


def test_predict_interactive_caption(caption_run, release_dir):
    output_dir, _ = caption_run
    row, image_path = caption_example(release_dir)
    reference = reference_prediction(output_dir, row["paper_id"], image_path, row["question"], row["caption"])
    request = {"paper_id": row["paper_id"], "image": str(image_path), "question": row["question"], "caption": row["caption"]}
    process = run_script_with_input(
        [sys.executable, "predict.py", "--checkpoint_dir", str(output_dir), "--interactive", "--top_k", str(len(reference))],
        json.dumps(request) + "\n",
    )
    predicted = json.loads(process.stdout.splitlines()[0])
    assert predicted["answer"] == top_answer(reference)
    assert_same_probabilities(predicted["top_k"], reference)


def test_predict_csv_caption_column(caption_run, release_dir, tmp_path):
    output_dir, _ = caption_run
    row, image_path = caption_example(release_dir)
    reference = reference_prediction(output_dir, row["paper_id"], image_path, row["question"], row["caption"])
    input_csv = tmp_path / "questions.csv"
    pd.DataFrame([{"paper_id": row["paper_id"], "Question": row["question"], "Image": row["image"],
                   "Caption": row["caption"]}]).to_csv(input_csv, index=False)
    output_csv = tmp_path / "answers.csv"
    run_script([
        sys.executable, "predict.py", "--checkpoint_dir", str(output_dir), "--input_csv", str(input_csv),
        "--output_csv", str(output_csv), "--data_dir", str(release_dir / "images"), "--num_workers", "0",
        "--no_image_cache", "--top_k", str(len(reference)),
    ])
    answers = pd.read_csv(output_csv, dtype=str, keep_default_na=False)
    assert answers["predicted_answer"][0] == top_answer(reference)
    assert_same_probabilities(json.loads(answers["top_k"][0]), reference)


def run_script_with_input(arguments, stdin_text):
    import os
    import subprocess

    from conftest import REPO_ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(arguments, cwd=REPO_ROOT, input=stdin_text, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result
