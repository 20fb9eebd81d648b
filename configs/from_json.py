"""A config written as JSON (a study's run_config.json): `--config=configs/from_json.py:PATH`.

The study runner writes each run's full config into its workdir; this loader reads it back, so
the trainer's command line is the same for every run of a study.
"""

import json

import ml_collections
from etils import epath


def get_config(path):
    if not path:
        raise ValueError("configs/from_json.py needs a path: --config=configs/from_json.py:PATH")
    # epath reads local paths and, where a GCS backend is installed, gs:// URLs.
    return ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
