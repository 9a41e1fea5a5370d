"""Write a synthetic SPIQA split in the release's JSON layout, with one image per figure.

The default sizes match SPIQA_train.json as the SPIQA paper describes it: about 270,000
questions on 25,859 papers. Figure files are hard links to a few small PNGs, so the folder
costs directory entries rather than disk space.

    python benchmarks/make_synthetic_release.py --output_dir /tmp/spiqa_synthetic
"""

import argparse
import json
import os
import random
from pathlib import Path

from PIL import Image

WORDS = (
    "model accuracy table figure training loss dataset baseline method results layer attention "
    "encoder decoder performance error rate score precision recall benchmark input output image "
    "graph curve epoch learning parameter network feature sample test validation proposed shows "
    "compared higher lower best worst increase decrease approach improvement metric value"
).split()
LINKS_PER_TEMPLATE = 50_000
SHORT_ANSWERS = ("Yes.", "No.", "yes", "Table 2", "The proposed method.", "BERT", "ResNet-50", "0.5")


def sentence(generator, low, high):
    return " ".join(generator.choice(WORDS) for _ in range(generator.randint(low, high))).capitalize() + "."


def write_release(output_dir, papers, questions, figures_per_paper, seed):
    """Write <output_dir>/SPIQA_train.json and <output_dir>/images/<paper_id>/<figure>.

    Returns (question count, figure count).
    """
    generator = random.Random(seed)
    output_dir = Path(output_dir)
    images_dir = output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    template = None

    release = {}
    question_count = 0
    figure_count = 0
    for paper_number in range(papers):
        paper_id = f"{1800 + paper_number // 10000}.{paper_number % 10000:05d}v1"
        paper_dir = images_dir / paper_id
        paper_dir.mkdir(exist_ok=True)

        all_figures = {}
        for figure_number in range(figures_per_paper):
            is_table = figure_number % 3 == 2
            name = f"{paper_id}-{'Table' if is_table else 'Figure'}{figure_number + 1}-1.png"
            all_figures[name] = {
                "caption": sentence(generator, 10, 60),
                "content_type": "table" if is_table else "figure",
                "figure_type": "table" if is_table else "plot",
            }
            # ext4 allows 65,000 links to one file, so a new template starts every LINKS_PER_TEMPLATE.
            if figure_count % LINKS_PER_TEMPLATE == 0:
                template = output_dir / f"figure{figure_count // LINKS_PER_TEMPLATE}.png"
                Image.new("RGB", (32, 24), (255, 255, 255)).save(template)
            if not (paper_dir / name).exists():
                os.link(template, paper_dir / name)
            figure_count += 1

        # Spread the questions evenly, so the total matches the request.
        paper_questions = (questions * (paper_number + 1)) // papers - (questions * paper_number) // papers
        names = list(all_figures)
        qa = []
        for _ in range(paper_questions):
            if generator.random() < 0.3:
                answer = generator.choice(SHORT_ANSWERS)
            else:
                answer = sentence(generator, 5, 40)
            qa.append({
                "question": sentence(generator, 8, 25)[:-1] + "?",
                "answer": answer,
                "explanation": sentence(generator, 10, 50),
                "reference": generator.choice(names),
            })
        question_count += len(qa)
        release[paper_id] = {"paper_id": paper_id, "all_figures": all_figures, "qa": qa}

    with open(output_dir / "SPIQA_train.json", "w", encoding="utf-8") as handle:
        json.dump(release, handle)
    return question_count, figure_count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="folder for SPIQA_train.json and images/")
    parser.add_argument("--papers", type=int, default=25_859, help="number of papers")
    parser.add_argument("--questions", type=int, default=270_194, help="number of questions")
    parser.add_argument("--figures_per_paper", type=int, default=6, help="figures and tables per paper")
    parser.add_argument("--seed", type=int, default=0, help="seed of the text generator")
    args = parser.parse_args()

    questions, figures = write_release(args.output_dir, args.papers, args.questions, args.figures_per_paper, args.seed)
    print(f"wrote {questions} questions on {args.papers} papers and {figures} figures to {args.output_dir}")


if __name__ == "__main__":
    main()
