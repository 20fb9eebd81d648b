"""The paper's full-model finetuning (FMT) of the 1B model on WMT14 En-De (reference/paper.md section 3).

Needs the pretrained base in runs/1b_ul2 (`python -m ul2_lm.train --config=configs/1b_ul2.py
--workdir=runs/1b_ul2`). Other finetuning-data sizes and seeds:
`--config.data.finetune.num_examples=20000 --config.data.finetune.subset_seed=1`.

python -m ul2_lm.train --config=configs/1b_fmt.py --workdir=runs/1b_fmt
"""

from ul2_lm import config as config_lib


def get_config():
    return config_lib.paper_finetuning("fmt", "1b", task="ft_wmt14_ende")
