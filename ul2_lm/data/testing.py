"""Small data settings for tests and quick experiments: a vocabulary that trains in a second."""

import ml_collections

TINY_VOCAB = {"kind": "auto", "size": 512, "extra_ids": 100, "sample_documents": 2000}


def tiny_data_config(**overrides) -> ml_collections.ConfigDict:
    """A config.data for the embedded task with a tiny vocabulary and sequence length 128."""
    cfg = ml_collections.ConfigDict({
        "task": "ul2_embedded_ende",
        "vocab": dict(TINY_VOCAB, path=""),
        "seq_len": 128,
        "pack": True,
        "seed": 0,
        "ul2": {"preset": "ul2r", "rates": None},
        "text_files": "",
        "tfds": {"name": "", "data_dir": "", "text_feature": "text"},
        "eval_task": "",
        "eval_split": "validation",
        "num_eval_batches": 2,
    }, type_safe=False)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg
