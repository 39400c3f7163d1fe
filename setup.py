"""meshtron: Megatron-style training engine for long-sequence LLM post-training."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "engine" / "__init__.py").read_text(), version)

setup(
    name="meshtron",
    version=version["__version__"],
    description="Megatron-style training engine for long-sequence LLM post-training "
                "(TP x PP x CP x DP, ring/Ulysses/2D attention, Seq1F1B, FlexSP)",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "convert", "convert.*"]),
    package_data={"engine.flexsp": ["defaults/*.json"]},  # the FlexSP cost model's device files
    # torch: a range that the CPU 2.13 build and the GPU machines' 2.11 CUDA build both satisfy;
    # capped below 2.14, whose only wheel here is a multi-GB CUDA build.
    install_requires=[
        "torch>=2.6,<2.14",
        "transformers>=4.45",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "pyyaml>=6.0",
        "scipy>=1.11",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pyarrow>=14",
    ],
    extras_require={
        # datasets: tests write save_to_disk directories (the engine reads them with pyarrow alone)
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "megatron-core==0.16.1",
                "datasets>=2.16"],
        "gpu": ["flash-attn>=2.6", "cut-cross-entropy>=25.1"],
        "tensorboard": ["tensorboard>=2.14"],  # train.tensorboard (torch.utils.tensorboard)
        "wandb": ["wandb>=0.17"],  # train.wandb_project
    },
    entry_points={"console_scripts": ["meshtron-train=engine.cli:main", "meshtron-convert=convert.cli:main",
                                    "meshtron-plan=engine.plan.cli:main"]},
)
