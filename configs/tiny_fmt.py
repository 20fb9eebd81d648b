"""Full-model finetuning (FMT) of the tiny model, with the paper's FMT settings (peak LR 1e-3, batch 128).

Finetunes the tiny model pretrained by configs/tiny_ul2.py:
    python -m ul2_lm.train --config=configs/tiny_ul2.py --workdir=runs/tiny_ul2
    python -m ul2_lm.train --config=configs/tiny_fmt.py --workdir=runs/tiny_fmt
on 1,000 embedded xen->xde translation pairs (a seeded subset; change it with
--config.data.finetune.num_examples / subset_seed); see `config_lib.tiny_finetuning`.
"""

from ul2_lm import config as config_lib


def get_config():
    return config_lib.tiny_finetuning("fmt")
