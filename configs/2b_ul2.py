"""UL2 pretraining of the paper's 2B bilingual model (Table 3 shapes; see reference/paper.md).

The size table in ul2_lm/model_sizes.py holds every size: `--config.model.size=16b` turns any of
these files into another. `python -m ul2_lm.plan --config=configs/2b_ul2.py` reports per-device
memory for a mesh before a slice is paid for.
"""

from ul2_lm import config as config_lib


def get_config():
    return config_lib.paper_pretraining("2b")
