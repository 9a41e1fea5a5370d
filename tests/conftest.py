"""Shared fixtures: the shipped data set and small offline encoders written once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "OverheatData"
sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def offline_models(tmp_path_factory):
    """Return (vision_dir, text_dir) of tiny random ViT and BERT checkpoints without dropout.

    Dropout is off so that runs with the same seed are comparable across process counts.
    """
    from dataset import read_questions_for_tokenizer
    from utils import write_offline_models

    output_dir = tmp_path_factory.mktemp("offline_models")
    vision_dir, text_dir = write_offline_models(output_dir, read_questions_for_tokenizer(DATA_DIR), dropout=0.0)
    return str(vision_dir), str(text_dir)


@pytest.fixture(scope="session")
def image_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("image_cache"))


def run_script(arguments, timeout=600, env=None, check=True):
    """Run a Python script of the repository in a subprocess and return the CompletedProcess."""
    process_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    process_env.update(env or {})
    result = subprocess.run(
        arguments, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=process_env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{arguments} exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def train_command(offline_models, output_dir, cache_dir, *extra, launcher=None):
    """Return the argument list of a train.py run on the shipped data with the offline encoders."""
    vision_dir, text_dir = offline_models
    prefix = launcher or [sys.executable]
    return [
        *prefix,
        "train.py",
        "--data_dir", str(DATA_DIR),
        "--vision_model", vision_dir,
        "--text_model", text_dir,
        "--output_dir", str(output_dir),
        "--cache_dir", str(cache_dir),
        "--num_workers", "0",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained_run(offline_models, image_cache_dir, tmp_path_factory):
    """Train two epochs on the whole shipped data set in one process and return the run directory."""
    output_dir = tmp_path_factory.mktemp("run") / "single"
    run_script(train_command(offline_models, output_dir, image_cache_dir, "--epochs", "2", "--batch_size", "16"))
    return output_dir


@pytest.fixture(scope="session")
def torchrun_run(offline_models, image_cache_dir, tmp_path_factory):
    """Train one epoch on the shipped data with two torchrun processes (gloo) and return the run directory."""
    output_dir = tmp_path_factory.mktemp("run") / "torchrun"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = train_command(offline_models, output_dir, image_cache_dir, "--epochs", "1", "--batch_size", "8",
                            "--multi_gpu", launcher=launcher)
    run_script(command)
    return output_dir
