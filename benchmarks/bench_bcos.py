"""Speed and memory of B-cos layers, B-cosified models, explanations and conversion.

Every figure is a ratio measured side by side in this one run: the variants are timed in
interleaved repeats and the medians compared; each model's timings run in a process of their own.
Prints markdown tables and writes JSON.

    python benchmarks/bench_bcos.py                      # CPU, 1 thread, batch 8, all sections
    python benchmarks/bench_bcos.py --device cuda --batch 64 --dtype bfloat16

On CPU the process re-executes itself with fixed glibc malloc settings (freed memory is kept and
reused instead of being returned to the OS), because timings of fresh large allocations were
dominated by page faults under the defaults.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# glibc malloc on CPU: freed memory stays in the heap (trim threshold) and is reused; allocations up
# to 32 MiB come from the heap (mmap threshold), larger ones too because the heap grows in 1 GiB
# steps (top pad) and serves them before mmap would. Both models then run on reused pages; with the
# defaults, fresh pages of large activations (ConvNeXt-T's 38 MB MLP activations at batch 8) cost
# page faults in one model and not the other, depending on the state of the heap.
MALLOC_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 1024**3),
    "MALLOC_TOP_PAD_": str(1024**3),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype on GPU")
    parser.add_argument("--sections", default="layers,models,compiled,compiled_regions,explain,memory,conversion")
    parser.add_argument("--models", default="resnet50,convnext_tiny,vit_small")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--json", default="benchmarks/results.json")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "TASK"), help=argparse.SUPPRESS)
    parser.add_argument("--row-probe", nargs=2, metavar=("SECTION", "MODEL"), help=argparse.SUPPRESS)
    return parser.parse_args()


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def source_model(name: str, image_size: int = 224):
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    if name == "resnet50":
        return ResNetForImageClassification(ResNetConfig(num_labels=1000))
    if name == "convnext_tiny":
        return ConvNextForImageClassification(ConvNextConfig(num_labels=1000))
    if name == "vit_small":
        return ViTForImageClassification(
            ViTConfig(
                image_size=image_size, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=1000
            )
        )
    if name == "vit_base":
        return ViTForImageClassification(ViTConfig(image_size=image_size, num_labels=1000))
    if name == "dinov2_small":
        from transformers import Dinov2Config, Dinov2ForImageClassification

        return Dinov2ForImageClassification(
            Dinov2Config(image_size=image_size, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_labels=1000)
        )
    raise ValueError(name)


def processor(size: int):
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def model_pair(name: str, args):
    import torch

    from transformers_bcos import bcosify_pretrained

    torch.manual_seed(0)
    standard = source_model(name, args.image_size)
    bcos = bcosify_pretrained(standard, image_processor=processor(args.image_size))
    return standard.to(args.device), bcos.to(args.device)


def synchronize(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(variants: dict, repeats: int, device: str, warmups: int = 1) -> dict:
    """name -> median seconds of ``fn()``, the variants timed in turn (after ``warmups`` calls each)."""
    for _ in range(warmups):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def autocast(args):
    import contextlib

    import torch

    if args.dtype == "bfloat16":
        return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(model, x, labels, optimizer, args):
    with autocast(args):
        loss = model(pixel_values=x, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

# (name, in channels, out channels, kernel, stride, groups, input size at 224 px)
LAYER_SHAPES = [
    ("ResNet-50 stem 7×7/2", 3, 64, 7, 2, 1, 224),
    ("ResNet-50 3×3 stage 1", 64, 64, 3, 1, 1, 56),
    ("ResNet-50 3×3 stage 2", 128, 128, 3, 1, 1, 28),
    ("ResNet-50 3×3 stage 3", 256, 256, 3, 1, 1, 14),
    ("ResNet-50 3×3 stage 4", 512, 512, 3, 1, 1, 7),
    ("ResNet-50 1×1 256→64", 256, 64, 1, 1, 1, 56),
    ("ResNet-50 1×1 1024→256", 1024, 256, 1, 1, 1, 14),
    ("ConvNeXt-T 7×7 depthwise 96", 96, 96, 7, 1, 96, 56),
    ("ConvNeXt-T 7×7 depthwise 768", 768, 768, 7, 1, 768, 7),
]
LINEAR_SHAPES = [("ViT-S linear 384→1536", 384, 1536), ("ViT-S linear 1536→384", 1536, 384)]


def bench_layers(args) -> list:
    import torch
    from torch import nn

    from transformers_bcos.layers import BcosConv2d, BcosLinear, encode_pixel_values

    rows = []
    scale = args.image_size / 224
    for name, cin, cout, k, stride, groups, size in LAYER_SHAPES:
        size = max(int(size * scale), k)
        standard = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False).to(args.device)
        if cin == 3:  # the stem: an image in, no input gradient; the B-cos stem reads its 6-channel encoding
            bcos = BcosConv2d(6, cout, k, stride, k // 2, encoded_image_input=True).to(args.device)
            x_std = torch.rand(args.batch, cin, size, size, device=args.device)
            x_bcos = encode_pixel_values(torch.rand(args.batch, cin, size, size, device=args.device))
        else:
            bcos = BcosConv2d(cin, cout, k, stride, k // 2, groups=groups).to(args.device)
            x_std = torch.randn(args.batch, cin, size, size, device=args.device, requires_grad=True)
            x_bcos = torch.randn(args.batch, cin, size, size, device=args.device, requires_grad=True)
        rows.append(_layer_row(name, standard, bcos, x_std, x_bcos, args))
    for name, fin, fout in LINEAR_SHAPES:
        tokens = (args.image_size // 16) ** 2 + 1
        standard, bcos = nn.Linear(fin, fout).to(args.device), BcosLinear(fin, fout).to(args.device)
        x = torch.randn(args.batch, tokens, fin, device=args.device, requires_grad=True)
        rows.append(_layer_row(name, standard, bcos, x, x, args))
    return rows


def _layer_row(name, standard, bcos, x_std, x_bcos, args) -> dict:
    import torch

    def forward(layer, x):
        def run():
            with torch.no_grad(), autocast(args):
                layer(x)

        return run

    def forward_backward(layer, x):
        def run():
            with autocast(args):
                layer(x).float().sum().backward()

        return run

    fwd = interleaved({"standard": forward(standard, x_std), "bcos": forward(bcos, x_bcos)}, args.repeats, args.device)
    both = interleaved({"standard": forward_backward(standard, x_std), "bcos": forward_backward(bcos, x_bcos)}, args.repeats, args.device)
    return {
        "layer": name,
        "forward_ms": [1e3 * fwd["standard"], 1e3 * fwd["bcos"]],
        "forward_ratio": fwd["bcos"] / fwd["standard"],
        "forward_backward_ms": [1e3 * both["standard"], 1e3 * both["bcos"]],
        "forward_backward_ratio": both["bcos"] / both["standard"],
    }


def probe_command(args, flag: str, *values: str) -> list:
    """This script run as a probe (``flag`` and its ``values``) with the run's settings."""
    command = [sys.executable, __file__, flag, *values, "--device", args.device, "--batch", str(args.batch), "--repeats", str(args.repeats)]
    return command + ["--image-size", str(args.image_size), "--threads", str(args.threads), "--dtype", args.dtype, "--ig-steps", str(args.ig_steps)]


def in_fresh_process(section: str, name: str, args) -> dict:
    """One model's row of a timed section, measured in a process of its own: how the heap was
    left by the models measured before moved ratios by up to 0.04 (ConvNeXt-T inference 1.09 alone,
    1.13 after ResNet-50)."""
    probe = subprocess.run(probe_command(args, "--row-probe", section, name), capture_output=True, text=True)
    if probe.returncode:
        raise RuntimeError(f"The {section} probe of {name} failed:\n{probe.stderr}")
    return json.loads(probe.stdout.strip().splitlines()[-1])


ROW_PROBES = {
    "models": lambda name, args: _model_row(name, args, compilation=None),
    "compiled": lambda name, args: _model_row(name, args, compilation="whole"),
    "compiled_regions": lambda name, args: _model_row(name, args, compilation="regions"),
    "explain": lambda name, args: _explain_row(name, args),
}


def bench_models(args, section: str = "models") -> list:
    """Inference and training step of each model pair, eager or compiled (`_model_row`)."""
    return [in_fresh_process(section, name, args) for name in args.models.split(",")]


def _model_row(name: str, args, compilation) -> dict:
    """One model pair's inference and training step. ``compilation``: None (eager), "whole"
    (``torch.compile`` of each model) or "regions" (accelerate's regional compilation, as
    ``accelerate launch --dynamo_use_regional_compilation`` does: each stage or layer of a
    repeated block list compiled on its own). Inductor, default mode; the warm-up calls compile
    and are not timed."""
    import torch

    standard, bcos = model_pair(name, args)
    if compilation == "whole":
        standard, bcos = torch.compile(standard), torch.compile(bcos)
    elif compilation == "regions":
        from accelerate.utils import compile_regions

        # Static shapes, as `accelerate launch` sets them (with automatic dynamic shapes inductor
        # fails on the second ConvNeXt stage, standard and B-cos alike: pytorch/pytorch#185510).
        # The stages share one forward at four shapes, each in training and in inference: room
        # for one compiled entry per stage and mode.
        torch._dynamo.config.recompile_limit = 64
        standard, bcos = compile_regions(standard, dynamic=False), compile_regions(bcos, dynamic=False)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=args.device)
    labels = torch.randint(0, 1000, (args.batch,), device=args.device)
    standard.eval(), bcos.eval()

    def infer(model):
        def run():
            with torch.no_grad(), autocast(args):
                model(pixel_values=x)

        return run

    # Compiled code may compile again on its second call (guards specialise after the first).
    warmups = 2 if compilation else 1
    inference = interleaved({"standard": infer(standard), "bcos": infer(bcos)}, args.repeats, args.device, warmups)
    standard.train(), bcos.train()
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in (("standard", standard), ("bcos", bcos))}
    train = interleaved(
        {
            "standard": lambda: training_step(standard, x, labels, optimizers["standard"], args),
            "bcos": lambda: training_step(bcos, x, labels, optimizers["bcos"], args),
        },
        args.repeats,
        args.device,
        warmups,
    )
    return {
        "model": name,
        "inference_ms": [1e3 * inference["standard"], 1e3 * inference["bcos"]],
        "inference_ratio": inference["bcos"] / inference["standard"],
        "train_step_ms": [1e3 * train["standard"], 1e3 * train["bcos"]],
        "train_step_ratio": train["bcos"] / train["standard"],
        "train_images_per_s": [args.batch / train["standard"], args.batch / train["bcos"]],
    }


def _grad_cam_layer(model):
    """The last convolutional stage (CNNs) or the last transformer layer (ViTs)."""
    from torch import nn

    if hasattr(model, "vit"):
        return model.vit.layers[-1]
    stages = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return stages[0][-1] if stages else None


def bench_explain(args) -> list:
    return [in_fresh_process("explain", name, args) for name in args.models.split(",")]


def _explain_row(name: str, args) -> dict:
    import torch
    from captum.attr import IntegratedGradients, LayerGradCam

    standard, bcos = model_pair(name, args)
    standard.eval(), bcos.eval()
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=args.device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=args.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=args.device).view(1, 3, 1, 1)
    target = torch.arange(args.batch, device=args.device) % 1000

    def logits_of(model):
        return lambda inputs: model(pixel_values=inputs).logits

    ig = IntegratedGradients(logits_of(standard))
    cam_layer = _grad_cam_layer(standard)
    grad_cam = LayerGradCam(logits_of(standard), cam_layer)

    def forward():
        with torch.no_grad(), autocast(args):
            bcos(pixel_values=x)

    def explain():
        with autocast(args):
            bcos.explain(x, target=target)

    def integrated_gradients():
        ig.attribute((x - mean) / std, target=target, n_steps=args.ig_steps, internal_batch_size=args.batch)

    def gradcam():
        grad_cam.attribute((x - mean) / std, target=target)

    fast = interleaved({"forward": forward, "explain": explain}, args.repeats, args.device)
    # IG runs 50 forward+backward passes: one timed run each is stable, and all are warm by now.
    slow = interleaved({"explain": explain, "ig": integrated_gradients, "gradcam": gradcam}, 1, args.device, warmups=0)
    return {
        "model": name,
        "forward_ms": 1e3 * fast["forward"],
        "explain_ms": 1e3 * fast["explain"],
        "explain_over_forward": fast["explain"] / fast["forward"],
        "ig_ms": 1e3 * slow["ig"],
        "ig_over_explain": slow["ig"] / slow["explain"],
        "gradcam_ms": 1e3 * slow["gradcam"],
        "gradcam_over_explain": slow["gradcam"] / slow["explain"],
    }


def memory_probe(model_name: str, task: str, args) -> dict:
    """Peak memory (MiB) of one training step or one explain() call, measured in this process."""
    import torch

    standard, bcos = model_pair(model_name, args)
    model = standard if task.startswith("standard") else bcos
    del standard, bcos  # only the measured model stays alive
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=args.device)
    labels = torch.randint(0, 1000, (args.batch,), device=args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # Both tasks are measured cold, in a fresh process: the first training step includes creating
    # the optimizer state, as it would in any run.
    if task.endswith("train"):
        model.train()

        def run():
            training_step(model, x, labels, optimizer, args)

    else:
        model.eval()

        def run():
            with autocast(args):
                model.explain(x, target=0)

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
    # Reset the process's peak-RSS mark (Linux: "5" > clear_refs), so VmHWM afterwards is the peak
    # of this call alone; big tensors are mmapped and unmapped (see bench_memory), so RSS tracks
    # live tensors.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    run()
    return {"peak_mib": (_status_kib("VmHWM") - before) / 1024}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bench_memory(args) -> list:
    rows = []
    for name in args.models.split(","):
        measured = {}
        for task in ("standard_train", "bcos_train", "bcos_explain"):
            command = probe_command(args, "--memory-probe", name, task)
            # A fixed, low mmap threshold: freed tensors go back to the OS instead of staying in the
            # heap, so the resident set follows the live tensors.
            env = {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS}
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            measured[task] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
        rows.append(
            {
            "model": name,
                "train_peak_mib": [measured["standard_train"], measured["bcos_train"]],
                "train_peak_ratio": measured["bcos_train"] / measured["standard_train"],
                "explain_peak_mib": measured["bcos_explain"],
                "explain_over_standard_train": measured["bcos_explain"] / measured["standard_train"],
            }
        )
    return rows


def bench_conversion(args) -> list:
    """Loading a checkpoint as it is against B-cosifying it, with and without the exactness check
    (one float64 pass, `transformers_bcos.conversion.exactness`): for ViT-B/16 (at its fixed
    224 px), DINOv2-S/14 (at a small input: it takes any size) and CLIP."""
    from transformers import AutoModelForImageClassification

    from transformers_bcos import bcosify_pretrained

    def timed_conversion(folder: str, load) -> dict:
        return interleaved(
            {
                "from_pretrained": lambda: load(folder),
                "bcosify_unchecked": lambda: bcosify_pretrained(folder, check=False),
                "bcosify_checked": lambda: bcosify_pretrained(folder),
            },
            max(3, args.repeats // 2),
            "cpu",
        )

    rows = []
    for name, label in (("vit_base", "ViT-B/16 (86M parameters)"), ("dinov2_small", "DINOv2-S/14 (22M parameters, rules)")):
        with tempfile.TemporaryDirectory() as folder:
            source_model(name, args.image_size).save_pretrained(folder)
            processor(args.image_size).save_pretrained(folder)
            rows.append(conversion_row(f"{label}, local folder", timed_conversion(folder, AutoModelForImageClassification.from_pretrained)))
    # B-cos CLIP: the image tower converted by the rules, the text tower copied; the check explains
    # the cosine with two texts in float64.
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    with tempfile.TemporaryDirectory() as folder:
        CLIPModel(CLIPConfig()).save_pretrained(folder)
        CLIPImageProcessor().save_pretrained(folder)
        rows.append(conversion_row("CLIP ViT-B/32 (151M parameters, image tower by the rules), local folder",
                                   timed_conversion(folder, CLIPModel.from_pretrained)))
    return rows


def conversion_row(checkpoint: str, times: dict) -> dict:
    return {
        "checkpoint": checkpoint,
        "from_pretrained_s": times["from_pretrained"],
        "bcosify_pretrained_check_false_s": times["bcosify_unchecked"],
        "ratio_check_false": times["bcosify_unchecked"] / times["from_pretrained"],
        "bcosify_pretrained_s": times["bcosify_checked"],
        "check_s": times["bcosify_checked"] - times["bcosify_unchecked"],
    }


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def markdown_table(rows: list) -> str:
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(value):
        if isinstance(value, list):
            return " / ".join(cell(v) for v in value)
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def machine_description(args) -> str:
    import torch

    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s)"
    return f"{device}; torch {torch.__version__}; batch {args.batch}; {args.image_size} px; {args.dtype}"


def main():
    args = parse_args()
    if args.device == "cpu" and not args.memory_probe and any(os.environ.get(k) != v for k, v in MALLOC_SETTINGS.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_SETTINGS})
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, args)))
        return
    if args.row_probe:
        section, name = args.row_probe
        print(json.dumps(ROW_PROBES[section](name, args)))
        return
    sections = {
        "layers": bench_layers,
        "models": bench_models,
        "compiled": lambda args: bench_models(args, "compiled"),
        "compiled_regions": lambda args: bench_models(args, "compiled_regions"),
        "explain": bench_explain,
        "memory": bench_memory,
        "conversion": bench_conversion,
    }
    results = {"machine": machine_description(args), "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    print(f"# B-cos benchmark: {results['machine']}\n")
    for name in args.sections.split(","):
        started = time.perf_counter()
        results[name] = sections[name](args)
        print(f"## {name} ({time.perf_counter() - started:.0f} s)\n\n{markdown_table(results[name])}\n", flush=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
