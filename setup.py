"""Packaging for megatron_sapo. CI pins exact versions through requirements/ci-constraints.txt (Python 3.11,
torch 2.13.0 CPU, megatron-core 0.16.1); the ranges below are what GPU clusters may use (Python 3.12+, newer
megatron-core and torch, TransformerEngine)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("megatron_sapo/__init__.py").read_text()).group(1)

setup(
    name="megatron-sapo",
    version=VERSION,
    description="RL post-training of Mixture-of-Experts LLMs with SAPO on Megatron-Core, with fused "
    "vocab-parallel log-prob / ratio / soft-gate kernels",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_sapo", "megatron_sapo.*"]),
    install_requires=[
        "torch>=2.6",
        # 0.16.1 is the newest release for Python 3.11; clusters on Python 3.12+ may take newer ones.
        "megatron-core>=0.16.1,<0.20",
        "math-verify>=0.9,<1",  # symbolic answer equivalence of the math reward (parse / verify without timeouts)
        # MLflow tracking needs only the client; sqlalchemy + alembic are its embedded sqlite store. A tracking server
        # is a separate install of the full `mlflow` (requirements/mlflow-server.txt), whose pyarrow<26 would clash.
        "mlflow-skinny>=3.1,<4",
        "sqlalchemy>=1.4,<3",
        "alembic>=1.11,<2",
        "numpy>=1.24",
        "packaging",
        "psutil",  # megatron-core's dist_checkpointing needs it without declaring it
        "pyarrow>=14",  # Parquet prompt files
        # structured configs, merging and dotted overrides (config.py); 2.3 pins antlr4-python3-runtime 4.9.*
        "omegaconf>=2.3,<2.5",
        "pyyaml>=6",
        "safetensors>=0.4",
        "transformers>=4.51",  # Qwen3 / Qwen3-MoE configs; also the reference the policy is tested against
    ],
    extras_require={
        "sglang": ["sglang>=0.5.23"],
        "te": ["transformer-engine[pytorch]>=2.0"],
        "plot": ["matplotlib>=3.8"],
        "dev": ["pytest>=8", "matplotlib>=3.8"],
        "bench": ["trl>=1.16,<2"],  # tools/bench_rl_step.py: TRL's GRPOTrainer(loss_type="sapo") side by side
    },
    entry_points={"console_scripts": ["megatron-sapo=megatron_sapo.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "License :: OSI Approved :: Apache Software License",
    ],
)
