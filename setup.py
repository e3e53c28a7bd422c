"""keel_jax: very deep decoder-only Transformers in JAX/Flax (Keel and its baselines)."""
from setuptools import find_packages, setup

setup(
    name="keel_jax",
    version="0.1.0",
    description="Keel (Post-LN with a scaled Highway shortcut) and baselines, scanned over depth, in JAX/Flax.",
    packages=find_packages(include=["keel_jax", "keel_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.18,<0.3",
        "ml-collections>=1.1,<2",
        "chex>=0.1.92,<0.2",
        "numpy>=2.0,<3",
        "absl-py>=2.1,<3",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.8,<4",
        "tokenizers>=0.20,<1",
        "etils[epath]>=1.7,<2",
    ],
    extras_require={
        # gs:// workdirs and data (keel_jax/paths.py)
        "gcs": ["gcsfs>=2024.6,<2027"],
        "test": ["pytest>=8,<10", "nbclient>=0.10,<1", "nbformat>=5.9,<6", "ipykernel>=6,<8",
                 "pytest-xdist>=3.5,<4",  # the suite runs on both cores (-n 2)
                 "gcsfs>=2024.6,<2027", "gcp-storage-emulator>=2024.1,<2027"],  # tests/test_gcs.py
        # libtpu (about 700 MB) for TPU runs and for ahead-of-time TPU compiles on any host
        # (python -m keel_jax.aot); same jax range as above, so pip keeps the installed jax.
        "tpu": ["jax[tpu]>=0.10,<0.13"],
    },
)
