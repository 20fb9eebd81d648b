"""UL2 pretraining of the tiny model on the embedded bilingual corpus: minutes on a laptop CPU.

python -m ul2_lm.train --config=configs/tiny_ul2.py --workdir=/tmp/tiny_ul2
"""

from ul2_lm import config as config_lib


def get_config():
    c = config_lib.default_config()
    c.model.size = "tiny"
    c.data.task = "ul2_embedded_ende"
    c.data.seq_len = 128
    c.train.num_steps = 300
    c.train.global_batch_size = 16
    c.train.eval_every_steps = 100
    c.train.log_every_steps = 20
    c.optim.peak_learning_rate = 0.01
    c.optim.final_learning_rate = 0.001
    c.optim.warmup_steps = 30
    c.checkpoint.every_steps = 100
    return c
