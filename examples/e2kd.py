#!/usr/bin/env python
"""e²KD with little data, on real MNIST digits (offline, CPU; RESULTS.md's section).

    python examples/e2kd.py [--seeds 0 1 2] [--max_train_samples 300] [--write_results RESULTS.md]

The teacher is the default standard ResNet (`default:resnet`, 0.3M parameters) B-cosified and
fine-tuned on the 4,000 embedded MNIST training digits with `examples/finetune.py`'s
`run_finetuning`. The student is a smaller B-cos ResNet (`STUDENT_CONFIG`: half the teacher's widths, about a
quarter of its parameters) trained from scratch on the first ``--max_train_samples`` of those
digits, for each seed, three ways:

* labels: the B-cos loss on the labels (no teacher);
* KD: Hinton's distillation of the teacher's logits at ``--temperature`` (`--explanation_distillation_weight 0`);
* e²KD: KD + ``--explanation_weight`` × (1 − cosine) of the student's and the teacher's
  explanations of the teacher's top-1 class.

Each student is measured on the 1,000 test digits: top-1 accuracy, top-1 agreement with the
teacher, and the mean cosine similarity of its explanation and the teacher's (of the teacher's
top-1 class). Writes results.json and results.md to ``--output_dir``; ``--write_results
RESULTS.md`` also puts the table into that file, between its e2kd markers.
"""

import argparse
import json
import os
import time

import torch
from transformers import ResNetConfig

from transformers_bcos import BcosForImageClassification
from transformers_bcos.data import ImageClassificationDataset, ImageProcessorCollator, image_processor_from_dict, load_embedded_dataset
from transformers_bcos.evaluation.reporting import mean_and_spread, run_description, write_experiment_results
from transformers_bcos.training import FinetuneOptions, run_finetuning
from transformers_bcos.training.distillation import Teacher, explanation_similarity

# The teacher's (the default ResNet's) stages at half their widths, one block each.
STUDENT_CONFIG = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic")
SETTINGS = ("labels", "KD", "e²KD")


def parameter_count(folder: str) -> int:
    return sum(p.numel() for p in BcosForImageClassification.from_pretrained(folder).parameters())


@torch.no_grad()
def measure_student(folder: str, teacher: Teacher, test_split) -> dict:
    model = BcosForImageClassification.from_pretrained(folder).eval()
    collator = ImageProcessorCollator(image_processor_from_dict(model.config.image_processor))
    loader = torch.utils.data.DataLoader(ImageClassificationDataset(test_split, "image", "label"), batch_size=250,
                                         collate_fn=collator)
    correct = agreeing = 0
    similarities = []
    for batch in loader:
        target = teacher.logits(batch["pixel_values"]).argmax(-1)
        explanation = model.explain(pixel_values=batch["pixel_values"], target=target)
        predicted = explanation.logits.argmax(-1)
        correct += (predicted == batch["labels"]).sum().item()
        agreeing += (predicted == target).sum().item()
        similarities.append(explanation_similarity(explanation.contributions, teacher.explain(batch["pixel_values"], target)))
    return {"accuracy": correct / len(test_split), "teacher_agreement": agreeing / len(test_split),
            "explanation_similarity": torch.cat(similarities).mean().item()}


def results_table(runs: list, teacher_metrics: dict, args) -> str:
    rows = ["| model | training | accuracy | top-1 agreement with the teacher | explanation similarity (cosine) |",
            "|---|---|---|---|---|",
            f"| teacher, B-cos ResNet ({teacher_metrics['parameters'] / 1e6:.2f}M) | 4,000 digits | "
            f"{100 * teacher_metrics['accuracy']:.1f}% | – | – |"]
    for setting in SETTINGS:
        chosen = [r for r in runs if r["setting"] == setting]
        if not chosen:
            continue
        description = {"labels": "labels only", "KD": f"KD, T = {args.temperature:g}",
                       "e²KD": f"e²KD, T = {args.temperature:g}, λ = {args.explanation_weight:g}"}[setting]
        rows.append(f"| student, B-cos ResNet ({chosen[0]['parameters'] / 1e6:.2f}M) | {description}, "
                    f"{args.max_train_samples:,} digits | " + " | ".join([
                        mean_and_spread([r["accuracy"] for r in chosen], percent=True),
                        mean_and_spread([r["teacher_agreement"] for r in chosen], percent=True),
                        mean_and_spread([r["explanation_similarity"] for r in chosen])]) + " |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/e2kd")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_train_samples", type=int, default=300, help="The student's training digits.")
    parser.add_argument("--teacher_epochs", type=int, default=3)
    parser.add_argument("--student_epochs", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--explanation_weight", type=float, default=1.0)
    parser.add_argument("--write_results", default=None, metavar="RESULTS.md")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    teacher_folder = os.path.join(args.output_dir, "teacher")
    run_finetuning(FinetuneOptions(model="default:resnet", dataset="embedded:mnist", output_dir=teacher_folder,
                                   overwrite_output_dir=True, num_train_epochs=args.teacher_epochs,
                                   disable_progress_bar=True))
    teacher = Teacher(teacher_folder)
    test_split = load_embedded_dataset("mnist")["test"]
    student_config = os.path.join(args.output_dir, "student_config.json")
    STUDENT_CONFIG.to_json_file(student_config)

    runs = []
    for seed in args.seeds:
        for setting in SETTINGS:
            folder = os.path.join(args.output_dir, "runs", f"{setting.replace('²', '2')}-seed{seed}")
            run_started = time.perf_counter()
            run_finetuning(FinetuneOptions(
                from_scratch=student_config, image_size=28, dataset="embedded:mnist", output_dir=folder,
                overwrite_output_dir=True, max_train_samples=args.max_train_samples, max_eval_samples=200,
                num_train_epochs=args.student_epochs, seed=seed, disable_progress_bar=True,
                teacher=None if setting == "labels" else teacher_folder, distillation_temperature=args.temperature,
                explanation_distillation_weight=args.explanation_weight if setting == "e²KD" else 0.0,
            ))  # fmt: skip
            run = {"setting": setting, "seed": seed, "parameters": parameter_count(folder),
                   "train_seconds": time.perf_counter() - run_started, **measure_student(folder, teacher, test_split)}
            runs.append(run)
            print(json.dumps(run), flush=True)

    teacher_metrics = {"parameters": parameter_count(teacher_folder), **measure_student(teacher_folder, teacher, test_split)}
    table = results_table(runs, teacher_metrics, args)
    minutes = (time.perf_counter() - started) / 60
    text = (f"{table}\n\nMean ± standard deviation over seeds {', '.join(map(str, args.seeds))}; the students see "
            f"the first {args.max_train_samples:,} of the teacher's training digits for {args.student_epochs} epochs; "
            f"measured on the 1,000 test digits; {run_description(minutes)}.")
    write_experiment_results(args.output_dir, {"arguments": vars(args), "teacher": teacher_metrics, "runs": runs,
                                               "minutes": minutes}, text, args.write_results, "e2kd")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
