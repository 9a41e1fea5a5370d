"""Bad data, bad options, killed runs and untrusted files.

train.py and predict.py run as subprocesses, as users run them. Each bad input must stop with one
"error: ..." line and exit code 2 (3 for a non-finite loss), never with a traceback. A killed run
must resume to the weights of an uninterrupted one.
"""

import csv
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import DATA_DIR, REPO_ROOT, run_script, train_command

PAPERS = ("2101.00001v1", "2101.00002v2")
HEADER = ["paper_id", "Question", "Answer", "Image"]
VALID_ROW_COUNT = 8
BAD_ROW = VALID_ROW_COUNT + 1
TINY_RUN = ("--max_samples", "16", "--epochs", "2", "--batch_size", "4")


# ---------------------------------------------------------------------------------------------
# Bad data sets


def write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def make_data_dir(root, bad_rows=()):
    """Write root/data with eight valid rows on two papers followed by bad_rows; return the folder."""
    data_dir = root / "data"
    rows = []
    for paper in PAPERS:
        (data_dir / paper).mkdir(parents=True)
    for index in range(VALID_ROW_COUNT):
        paper = PAPERS[index % 2]
        name = f"figure{index}.png"
        Image.new("RGB", (32, 24), (30 * index, 100, 200)).save(data_dir / paper / name)
        rows.append([paper, f"What does figure {index} show?", f"answer {index % 3}", name])
    write_csv(data_dir / "training_data.csv", rows + [list(row) for row in bad_rows])
    return data_dir


def write_truncated_png(path):
    Image.effect_noise((20, 20), 40).convert("RGB").save(path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def write_truncated_jpeg(path):
    """Write a JPEG cut inside its scan data, so that its header still opens and only decoding fails."""
    Image.effect_noise((30, 30), 40).convert("RGB").save(path, quality=95)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) * 3 // 4])


def write_bomb_png(path, width=20000, height=20000):
    """Write a small PNG whose header claims width x height pixels, as a decompression bomb does."""
    Image.new("L", (1, 1)).save(path)
    content = bytearray(path.read_bytes())
    # The IHDR chunk starts at byte 8: length (4), type (4), width and height (4 each), then its CRC.
    content[16:24] = struct.pack(">II", width, height)
    content[29:33] = struct.pack(">I", zlib.crc32(bytes(content[12:29])))
    path.write_bytes(bytes(content))


def paper_file(name):
    """Return a setup step that writes a bad file named name into the first paper's folder."""
    writers = {
        "notes.png": lambda path: path.write_text("not a figure\n"),
        "truncated.png": write_truncated_png,
        "truncated.jpg": write_truncated_jpeg,
        "bomb.png": write_bomb_png,
        "large.png": lambda path: Image.new("RGB", (64, 64)).save(path),
        # 95 million pixels: above PIL's warning threshold of about 89.5 million, below its error threshold.
        "warning_size.png": lambda path: Image.new("1", (10000, 9500)).save(path),
    }
    return lambda data_dir: writers[name](data_dir / PAPERS[0] / name)


def write_outside_image(data_dir):
    Image.new("RGB", (32, 24)).save(data_dir.parent / "outside.png")


# id, bad row, setup step, extra options, problem kind, text the message must contain.
ROW_CASES = [
    ("empty_question", [PAPERS[0], "  ", "yes", "figure0.png"], None, (), "empty question", "question cell"),
    ("empty_answer", [PAPERS[0], "Why?", "", "figure0.png"], None, (), "empty answer", "answer cell"),
    ("empty_paper_id", ["", "Why?", "yes", "figure0.png"], None, (), "empty paper id", "paper_id cell"),
    ("invalid_paper_id", ["bad id!", "Why?", "yes", "figure0.png"], None, (), "invalid paper id", "'bad id!'"),
    ("empty_image_name", [PAPERS[0], "Why?", "yes", " "], None, (), "empty image name", "image cell"),
    ("missing_paper_folder", ["2101.09999v1", "Why?", "yes", "figure0.png"], None, (), "missing paper folder", "2101.09999v1"),
    ("missing_image", [PAPERS[0], "Why?", "yes", "absent.png"], None, (), "missing image", "absent.png"),
    ("parent_path", [PAPERS[0], "Why?", "yes", "../../outside.png"], write_outside_image, (),
     "image path outside the data directory", "../../outside.png"),
    ("absolute_path", [PAPERS[0], "Why?", "yes", "/etc/hostname"], None, (),
     "image path outside the data directory", "/etc/hostname"),
    ("not_an_image", [PAPERS[0], "Why?", "yes", "notes.png"], paper_file("notes.png"), (), "not an image", "notes.png"),
    ("truncated_png", [PAPERS[0], "Why?", "yes", "truncated.png"], paper_file("truncated.png"), (),
     "corrupt image", "truncated.png"),
    ("truncated_jpeg", [PAPERS[0], "Why?", "yes", "truncated.jpg"], paper_file("truncated.jpg"), (),
     "corrupt image", "truncated.jpg"),
    ("decompression_bomb", [PAPERS[0], "Why?", "yes", "bomb.png"], paper_file("bomb.png"), (),
     "image too large", "bomb.png"),
    ("above_pixel_limit", [PAPERS[0], "Why?", "yes", "large.png"], paper_file("large.png"),
     ("--max_image_pixels", "1000"), "image too large", "64x64 pixels exceeds the limit of 1000"),
    ("above_pil_warning_size", [PAPERS[0], "Why?", "yes", "warning_size.png"], paper_file("warning_size.png"),
     ("--max_image_pixels", "90000000"), "image too large", "10000x9500 pixels exceeds the limit of 90000000"),
]


def run_train(offline_models, image_cache_dir, data_dir, output_dir, *extra):
    command = train_command(offline_models, output_dir, image_cache_dir, *extra)
    command[command.index("--data_dir") + 1] = str(data_dir)
    return run_script(command, check=False)


@pytest.mark.parametrize("bad_row, setup, extra, kind, detail", [case[1:] for case in ROW_CASES],
                         ids=[case[0] for case in ROW_CASES])
def test_bad_row_strict(tmp_path, offline_models, image_cache_dir, bad_row, setup, extra, kind, detail):
    data_dir = make_data_dir(tmp_path, [bad_row])
    if setup is not None:
        setup(data_dir)
    result = run_train(offline_models, image_cache_dir, data_dir, tmp_path / "run", "--strict", *TINY_RUN, *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"row {BAD_ROW}: {kind}" in result.stderr
    assert detail in result.stderr
    assert "Traceback" not in result.stderr
    assert "DecompressionBombWarning" not in result.stderr
    assert not (tmp_path / "run" / "training_state.pt").exists()


def test_bad_rows_skipped_with_counts(tmp_path, offline_models, image_cache_dir):
    data_dir = make_data_dir(tmp_path, [case[1] for case in ROW_CASES])
    for case in ROW_CASES:
        if case[2] is not None:
            case[2](data_dir)
    result = run_train(
        offline_models, image_cache_dir, data_dir, tmp_path / "run",
        "--max_image_pixels", "1000", "--epochs", "1", "--batch_size", "4", "--val_fraction", "0.25",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipped {len(ROW_CASES)} of {VALID_ROW_COUNT + len(ROW_CASES)} rows" in result.stderr
    expected_counts = {}
    for case in ROW_CASES:
        expected_counts[case[4]] = expected_counts.get(case[4], 0) + 1
    for kind, count in expected_counts.items():
        assert f"{count} {kind}" in result.stderr
    for row in range(BAD_ROW, BAD_ROW + len(ROW_CASES)):
        assert f"row {row}:" in result.stderr
    assert "DecompressionBombWarning" not in result.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_all_rows_invalid(tmp_path, offline_models, image_cache_dir):
    data_dir = make_data_dir(tmp_path)
    write_csv(data_dir / "training_data.csv", [[PAPERS[0], "Why?", "yes", "absent.png"]] * 3)
    result = run_train(offline_models, image_cache_dir, data_dir, tmp_path / "run", *TINY_RUN)
    assert result.returncode == 2
    assert "has no valid rows: all 3 were skipped" in result.stderr
    assert "Traceback" not in result.stderr


def write_latin1_csv(path):
    path.write_bytes(f"{','.join(HEADER)}\n{PAPERS[0]},Qu'est-ce que c'est ?,café,figure0.png\n".encode("latin-1"))


# id, step that rewrites the CSV, text the message must contain.
FILE_CASES = [
    ("missing_columns", lambda path: write_csv(path, [[PAPERS[0], "Why?", "figure0.png"]], ["paper_id", "Question", "Image"]),
     "missing the column(s) answer; found: paper_id, Question, Image"),
    ("empty_csv", lambda path: path.write_text(""), "is empty"),
    ("header_only", lambda path: write_csv(path, []), "has a header but no data rows"),
    ("not_utf8", write_latin1_csv, "is not valid UTF-8"),
]


@pytest.mark.parametrize("rewrite, message", [case[1:] for case in FILE_CASES], ids=[case[0] for case in FILE_CASES])
def test_bad_csv_file(tmp_path, offline_models, image_cache_dir, rewrite, message):
    data_dir = make_data_dir(tmp_path)
    rewrite(data_dir / "training_data.csv")
    result = run_train(offline_models, image_cache_dir, data_dir, tmp_path / "run", *TINY_RUN)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Options


def write_file(path):
    path.write_text("a file, not a folder\n")
    return str(path)


# id, options (a callable gets tmp_path), text the message must contain.
OPTION_CASES = [
    ("batch_size", ("--batch_size", "0"), "--batch_size must be at least 1, got 0"),
    ("epochs", ("--epochs", "-1"), "--epochs must be at least 1"),
    ("learning_rate_zero", ("--learning_rate", "0"), "--learning_rate must be a positive number"),
    ("learning_rate_nan", ("--learning_rate", "nan"), "--learning_rate must be a positive number, got nan"),
    ("val_fraction", ("--val_fraction", "1"), "--val_fraction must be in [0.0, 1.0)"),
    ("dropout", ("--dropout", "-0.1"), "--dropout must be in [0.0, 1.0)"),
    ("num_workers", ("--num_workers", "-2"), "--num_workers must be a number of 0 or more"),
    ("weight_decay_nan", ("--weight_decay", "nan"), "--weight_decay must be a number of 0 or more"),
    ("dist_timeout", ("--dist_timeout_minutes", "inf"), "--dist_timeout_minutes must be a positive number"),
    ("max_image_pixels", ("--max_image_pixels", "0"), "--max_image_pixels must be at least 1"),
    ("gpu", ("--gpu", "99"), "--gpu 99"),
    ("data_dir", lambda tmp_path: ("--data_dir", str(tmp_path / "absent")), "--data_dir"),
    ("vision_model", lambda tmp_path: ("--vision_model", str(tmp_path)), "--vision_model"),
    ("output_dir", lambda tmp_path: ("--output_dir", write_file(tmp_path / "taken")), "--output_dir"),
    ("resume", lambda tmp_path: ("--resume", str(tmp_path)), "--resume"),
]


@pytest.mark.parametrize("options, message", [case[1:] for case in OPTION_CASES], ids=[case[0] for case in OPTION_CASES])
def test_invalid_option(tmp_path, offline_models, image_cache_dir, options, message):
    if callable(options):
        options = options(tmp_path)
    result = run_script(train_command(offline_models, tmp_path / "run", image_cache_dir, *TINY_RUN, *options), check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops(tmp_path, offline_models, image_cache_dir):
    result = run_script(
        train_command(offline_models, tmp_path / "run", image_cache_dir, *TINY_RUN, "--learning_rate", "1e30"), check=False
    )
    assert result.returncode == 3
    assert "error: the training loss became nan at epoch 1, step" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Killed runs and checkpoints

LAUNCHER_PREFIX = """\
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
import safetensors.torch
import torch
import train
"""

# Patches that a launcher applies to train.py before running it with the arguments after "train.py".
PAUSE_AFTER_EPOCH_1 = """\
write_history = train.write_history
def pausing_write_history(output_dir, history):
    write_history(output_dir, history)
    if history[-1]["epoch"] == 1:
        time.sleep(600)
train.write_history = pausing_write_history
"""

KILL_IN_STATE_WRITE = """\
torch_save = torch.save
def killing_save(obj, path, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch") == 2:
        Path(path).write_bytes(b"PK partly written training state")
        os.kill(os.getpid(), signal.SIGKILL)
    return torch_save(obj, path, *args, **kwargs)
torch.save = killing_save
"""

KILL_IN_WEIGHTS_WRITE = """\
save_file = safetensors.torch.save_file
def killing_save_file(tensors, path, metadata=None):
    if metadata and metadata.get("epoch") == "2":
        Path(path).write_bytes(b"partly written weights")
        os.kill(os.getpid(), signal.SIGKILL)
    return save_file(tensors, path, metadata=metadata)
safetensors.torch.save_file = killing_save_file
"""

FAIL_ON_RANK_1 = """\
train_one_epoch = train.train_one_epoch
def failing_train_one_epoch(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 stopped by the test")
    return train_one_epoch(*args, **kwargs)
train.train_one_epoch = failing_train_one_epoch
"""


def write_launcher(tmp_path, patch):
    """Write a script that applies patch to train.py and then runs train.main on the arguments after 'train.py'."""
    path = tmp_path / "launcher.py"
    path.write_text(LAUNCHER_PREFIX + patch + "train.main(sys.argv[sys.argv.index('train.py') + 1:])\n")
    return path


def read_state(run_dir):
    return torch.load(run_dir / "training_state.pt", map_location="cpu", weights_only=True)


def assert_same_weights(run_dir, reference_dir):
    weights = load_file(run_dir / "last.safetensors")
    reference = load_file(reference_dir / "last.safetensors")
    assert weights.keys() == reference.keys()
    for name, tensor in weights.items():
        # Softmax ignores a constant added to every score, so an attention key bias has a zero gradient in
        # exact arithmetic. AdamW divides its rounding noise (about 1e-10) by the noise's own size plus
        # eps, which moves the bias by up to a few 1e-6 in either direction from one process to the next.
        atol = 1e-5 if name.endswith("attention.self.key.bias") else 1e-6
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=atol, msg=lambda text: f"{name}: {text}")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, offline_models, image_cache_dir):
    """Return the run directory of an uninterrupted tiny run that every resumed run must match."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_script(train_command(offline_models, run_dir, image_cache_dir, *TINY_RUN))
    return run_dir


def resume(offline_models, image_cache_dir, run_dir):
    return run_script(train_command(offline_models, run_dir, image_cache_dir, "--resume", str(run_dir)))


def test_resume_after_kill(tmp_path, offline_models, image_cache_dir, reference_run):
    run_dir = tmp_path / "run"
    launcher = [sys.executable, str(write_launcher(tmp_path, PAUSE_AFTER_EPOCH_1))]
    command = train_command(offline_models, run_dir, image_cache_dir, *TINY_RUN, launcher=launcher)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        metrics = run_dir / "metrics.jsonl"
        try:
            # The launcher sleeps after writing epoch 1, so the process is alive when the line appears.
            while process.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
                time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert read_state(run_dir)["epoch"] == 1

    resume(offline_models, image_cache_dir, run_dir)
    assert read_state(run_dir)["epoch"] == 2
    assert_same_weights(run_dir, reference_run)
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_reads_saved_options(tmp_path, reference_run):
    import train

    # A run stopped after its first epoch: only that epoch is in metrics.jsonl.
    run_dir = copy_run(reference_run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")

    args = train.parse_args(["--resume", str(run_dir), "--num_workers", "1"])
    assert args.epochs == 2
    assert args.batch_size == 4
    assert args.num_workers == 1
    assert args.output_dir == str(run_dir)


def test_kill_in_state_write(tmp_path, offline_models, image_cache_dir, reference_run):
    run_dir = tmp_path / "run"
    launcher = [sys.executable, str(write_launcher(tmp_path, KILL_IN_STATE_WRITE))]
    result = run_script(train_command(offline_models, run_dir, image_cache_dir, *TINY_RUN, launcher=launcher), check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert read_state(run_dir)["epoch"] == 1

    # last.safetensors already contains epoch 2, so resuming must fall back to previous.safetensors.
    resume(offline_models, image_cache_dir, run_dir)
    assert_same_weights(run_dir, reference_run)


def test_kill_in_weights_write(tmp_path, offline_models, image_cache_dir, reference_run):
    run_dir = tmp_path / "run"
    launcher = [sys.executable, str(write_launcher(tmp_path, KILL_IN_WEIGHTS_WRITE))]
    result = run_script(train_command(offline_models, run_dir, image_cache_dir, *TINY_RUN, launcher=launcher), check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    from safetensors import safe_open

    with safe_open(str(run_dir / "last.safetensors"), framework="pt") as handle:
        assert handle.metadata()["epoch"] == "1"
    assert read_state(run_dir)["epoch"] == 1

    resume(offline_models, image_cache_dir, run_dir)
    assert_same_weights(run_dir, reference_run)


class CodeRunningPayload:
    """An object whose unpickling creates a marker file, as a malicious checkpoint would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def copy_run(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    return run_dir


def test_pickled_state_rejected(tmp_path, offline_models, image_cache_dir, reference_run):
    run_dir = copy_run(reference_run, tmp_path)
    marker = tmp_path / "code_ran"
    state = read_state(run_dir)
    state["payload"] = CodeRunningPayload(marker)
    torch.save(state, run_dir / "training_state.pt")

    command = train_command(offline_models, run_dir, image_cache_dir, "--resume", str(run_dir), "--epochs", "3")
    result = run_script(command, check=False)
    assert result.returncode == 2
    assert "training_state.pt was rejected" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_new_run_over_old_warns(tmp_path, offline_models, image_cache_dir, reference_run):
    run_dir = copy_run(reference_run, tmp_path)
    result = run_script(train_command(offline_models, run_dir, image_cache_dir, *TINY_RUN, "--epochs", "1"))
    assert f"pass --resume {run_dir} to continue it" in result.stderr


def test_resume_without_matching_weights(tmp_path, offline_models, image_cache_dir, reference_run):
    run_dir = copy_run(reference_run, tmp_path)
    state = read_state(run_dir)
    state["epoch"] = 5
    torch.save(state, run_dir / "training_state.pt")

    command = train_command(offline_models, run_dir, image_cache_dir, "--resume", str(run_dir), "--epochs", "6")
    result = run_script(command, check=False)
    assert result.returncode == 2
    assert "has no weights for epoch 5" in result.stderr
    assert "Traceback" not in result.stderr


def test_failed_rank_stops_others(tmp_path, offline_models, image_cache_dir):
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(write_launcher(tmp_path, FAIL_ON_RANK_1)),
    ]
    command = train_command(
        offline_models, tmp_path / "run", image_cache_dir, *TINY_RUN, "--multi_gpu", "--dist_timeout_minutes", "2",
        launcher=launcher,
    )
    result = run_script(command, timeout=300, check=False)
    assert result.returncode != 0
    assert "rank 1 stopped by the test" in result.stderr


# ---------------------------------------------------------------------------------------------
# predict.py

FIGURE = DATA_DIR / "1611.04684v1" / "1611.04684v1-Table5-1.png"


def predict(run_dir, *extra, paper_id="1611.04684v1", image=FIGURE, question="Which model performs best?"):
    command = [sys.executable, "predict.py", "--checkpoint_dir", str(run_dir), "--json"]
    command += ["--paper_id", paper_id, "--image", str(image), "--question", question, *extra]
    return run_script(command, check=False)


def drop_file(run_dir, name):
    (run_dir / name).unlink()


def add_answer(run_dir, name):
    label_map = json.loads((run_dir / name).read_text())
    label_map["an answer from another run"] = len(label_map)
    (run_dir / name).write_text(json.dumps(label_map))


def drop_model_setting(run_dir, name):
    config = json.loads((run_dir / "run_config.json").read_text())
    del config["model"][name]
    (run_dir / "run_config.json").write_text(json.dumps(config))


def shrink_head(run_dir, name):
    weights = load_file(run_dir / name)
    head = [key for key in weights if key.startswith("head.")][-1]
    weights[head] = weights[head][:1].clone()
    save_file(weights, run_dir / name)


# id, change to a copy of the run directory, text the message must contain.
RUN_DIR_CASES = [
    ("missing_label_map", lambda run_dir: drop_file(run_dir, "label_map.json"), "is missing label_map.json"),
    ("missing_weights", lambda run_dir: drop_file(run_dir, "model.safetensors"), "is missing model.safetensors"),
    ("label_map_size", lambda run_dir: add_answer(run_dir, "label_map.json"), "label_map.json has"),
    ("older_run_config", lambda run_dir: drop_model_setting(run_dir, "vision_config"), "lacks model settings vision_config"),
    ("other_architecture", lambda run_dir: shrink_head(run_dir, "model.safetensors"), "does not fit the architecture"),
]


@pytest.mark.parametrize("change, message", [case[1:] for case in RUN_DIR_CASES], ids=[case[0] for case in RUN_DIR_CASES])
def test_predict_bad_run_dir(tmp_path, reference_run, change, message):
    run_dir = copy_run(reference_run, tmp_path)
    change(run_dir)
    result = predict(run_dir)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# id, keyword arguments of predict, text the message must contain.
QUESTION_CASES = [
    ("missing_image", {"image": "absent/figure.png"}, "--image absent/figure.png not found"),
    ("empty_question", {"question": "   "}, "--question is empty"),
    ("paper_id_with_spaces", {"paper_id": "1611 04684; v1"}, "is not a paper id"),
    ("paper_id_parent", {"paper_id": "../1611.04684v1"}, "is not a paper id"),
    ("not_an_image", {"image": REPO_ROOT / "README.md"}, "not an image"),
]


@pytest.mark.parametrize("inputs, message", [case[1:] for case in QUESTION_CASES], ids=[case[0] for case in QUESTION_CASES])
def test_predict_bad_question(reference_run, inputs, message):
    result = predict(reference_run, **inputs)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_missing_gpu(reference_run):
    result = predict(reference_run, "--gpu", "99")
    assert result.returncode == 2
    assert "--gpu 99" in result.stderr


def test_predict_unseen_paper(reference_run):
    result = predict(reference_run, paper_id="2401.00001v1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["answer"] in json.loads((reference_run / "label_map.json").read_text())
    assert "was not seen in training" in result.stderr


def test_resume_finished_run_rejected(reference_run):
    result = run_script([sys.executable, "train.py", "--resume", str(reference_run), "--epochs", "2"], check=False)
    assert result.returncode == 2
    assert "has already finished 2 epochs; pass --epochs 3 or more" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_csv_without_answerable_rows(tmp_path, reference_run):
    rows = pd.read_csv(DATA_DIR / "training_data.csv", dtype=str, keep_default_na=False).iloc[:3]
    input_csv = tmp_path / "questions.csv"
    rows.to_csv(input_csv, index=False)
    result = run_script([sys.executable, "predict.py", "--checkpoint_dir", str(reference_run), "--input_csv",
                         str(input_csv), "--output_csv", str(tmp_path / "answers.csv")], check=False)
    assert result.returncode == 2
    assert "no row of" in result.stderr
    assert "--data_dir" in result.stderr
    assert not (tmp_path / "answers.csv").exists()


def test_interactive_reports_bad_lines(reference_run):
    lines = [
        json.dumps({"paper_id": "1611.04684v1", "question": "Which model performs best?"}),
        "not json",
        json.dumps({"paper_id": "1611.04684v1", "image": "absent.png", "question": "Which?"}),
        json.dumps({"paper_id": "1611.04684v1", "image": str(FIGURE), "question": "Which model performs best?"}),
    ]
    process = subprocess.run(
        [sys.executable, "predict.py", "--checkpoint_dir", str(reference_run), "--interactive"],
        cwd=REPO_ROOT, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300,
    )
    outputs = [json.loads(line) for line in process.stdout.splitlines()]
    assert process.returncode == 0
    assert len(outputs) == 4
    assert outputs[0]["error"] == "missing key(s) image; each line needs paper_id, image and question"
    assert outputs[1]["error"].startswith("the line is not valid JSON")
    assert outputs[2]["error"] == "image absent.png not found"
    assert outputs[3]["answer"] in json.loads((reference_run / "label_map.json").read_text())
