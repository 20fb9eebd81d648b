"""UL2 pretraining of the small model (tens of millions of parameters, sequence 512).

The CPU throughput benchmark's model, and a local model-size point above tiny.
"""

from ul2_lm import config as config_lib


def get_config():
    c = config_lib.default_config()
    c.model.size = "small"
    c.data.task = "ul2_embedded_ende"
    c.data.seq_len = 512
    c.train.num_steps = 2_000
    c.train.global_batch_size = 16
    c.train.eval_every_steps = 500
    c.train.log_every_steps = 20
    c.optim.warmup_steps = 200
    c.checkpoint.every_steps = 500
    return c
