"""ul2_lm, petuning and scaling: a study of how LLM finetuning scales."""

import setuptools

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "numpy>=2.0",
    "absl-py>=2.0",
    "tensorboardX>=2.6",
    "scipy>=1.13",
    "matplotlib>=3.8",
]
# Only the data modules import these: the model, trainer and benchmarks run without them.
DATA = [
    "seqio>=0.0.20",
    "tensorflow>=2.16",
    "tensorflow-text>=2.16",
    "tensorflow-datasets>=4.9",
    "sentencepiece>=0.2",
]

# Generation metrics (BLEU, chrF, ROUGE-L); BLEURT is optional and installed by hand.
EVAL = ["sacrebleu>=2.4", "rouge-score>=0.1.2"]

# Workdirs on gs:// (TPU pods): tensorboardX writes event files there through this; records and
# the vocabulary go through etils.epath (tf.io.gfile, from DATA); orbax writes checkpoints itself.
GCS = ["google-cloud-storage>=2.10"]

setuptools.setup(
    name="ul2-lm",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["ul2_lm*", "petuning*", "scaling*"]),
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "eval": EVAL,
        "test": DATA + EVAL + ["pytest>=8", "pytest-xdist>=3.5"],
        "tpu": ["jax[tpu]>=0.10.2", *GCS],
        "gcs": GCS,
        "gpu": ["jax[cuda12]>=0.10.2"],
    },
)
