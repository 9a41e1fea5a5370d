"""Time train.py's start-up (reading, validating, splitting and encoding labels) on a data set.

Runs train.prepare_data with the given train.py options and prints the rows read, the seconds
taken and the peak resident memory of the process.

    python benchmarks/make_synthetic_release.py --output_dir /tmp/spiqa_synthetic
    python benchmarks/measure_startup.py --train_file /tmp/spiqa_synthetic/SPIQA_train.json \\
        --train_images_dir /tmp/spiqa_synthetic/images --text_model offline_models/bert-tiny \\
        --vision_model offline_models/vit-tiny --use_caption --split_by paper
"""

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
import utils  # noqa: E402


def main():
    args = train.parse_args(sys.argv[1:])
    utils.setup_logging()
    context = utils.DistributedContext()

    started = time.perf_counter()
    prepared = train.prepare_data(args, context)
    seconds = time.perf_counter() - started

    # ru_maxrss is in kibibytes on Linux.
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = len(prepared["rows"])
    print(f"rows {rows}, start-up {seconds:.1f} s, peak memory {peak_mib:.0f} MiB, image check {args.image_check}")


if __name__ == "__main__":
    main()
