"""LoRA finetuning of the tiny model, with the paper's LoRA settings (rank 4, peak LR 1e-2, batch 16).

Finetunes the tiny model pretrained by configs/tiny_ul2.py:
    python -m ul2_lm.train --config=configs/tiny_ul2.py --workdir=runs/tiny_ul2
    python -m ul2_lm.train --config=configs/tiny_lora.py --workdir=runs/tiny_lora
on 1,000 embedded xen->xde translation pairs (a seeded subset; change it with
--config.data.finetune.num_examples / subset_seed), and measures loss, perplexity and BLEU/chrF
on the test split, zero-shot xsc->xde transfer and one-shot prompting at the end. Minutes on a
laptop CPU.
"""

from ul2_lm import config as config_lib


def get_config():
    c = config_lib.finetuning("lora")
    c.model.size = "tiny"
    c.finetune.base_workdir = "runs/tiny_ul2"
    c.data.task = "ft_embedded_xen_xde"
    c.data.seq_len = 128
    c.data.finetune.num_examples = 1_000
    c.data.num_eval_batches = 2
    c.train.num_steps = 200
    c.finetune.num_epochs = 20
    c.train.eval_every_steps = 50
    c.train.log_every_steps = 10
    c.optim.warmup_steps = 10
    c.checkpoint.every_steps = 50
    c.evaluation.num_generate_examples = 32
    c.evaluation.max_new_tokens = 48
    c.evaluation.zero_shot_tasks = ("ft_embedded_xsc_xde",)
    c.evaluation.few_shot = (1,)
    return c
