"""A complete miniature of the paper on a CPU: three tiny model sizes pretrained with UL2 on the
embedded corpus (a quarter of its documents bitext, so that pretraining teaches some
translation, as web text does), the middle one's intermediate checkpoint as the
pretraining-data factor; each finetuned by FMT, LoRA and prompt tuning on embedded xen->xde
translation over two decades of finetuning-data sizes (1 to 100 examples), two PET sizes per
method and two data subsets. Every finetuning run follows the paper's protocol in miniature:
the paper's per-method peak learning rates (FMT 1e-3, LoRA 1e-2, prompt 0.3) and Adafactor
with cosine decay, dev loss every epoch, early stopping, and the best checkpoint's test loss as
the scaling target. Zero-shot transfer to the related language pair (xsc->xde) is measured by
loss. Multiplicative and additive laws are fitted with held-out points, and the report tests
the paper's findings.

python -m scaling.study --config=configs/studies/tiny.py --workdir=runs/study_tiny
"""

import ml_collections

# Finetuning in the paper's protocol, at the miniature's scale (every finetuning run): dev loss
# every epoch (but not more often than every other step: an epoch of 2 examples is one step),
# and a stop once three evaluations and 20 steps bring no improvement.
FINETUNE_PROTOCOL = {
    # The same step budget and schedule for every data size (so that runs of one shape share
    # their compiled step): early stopping, not the budget, ends a run.
    "train": {"num_steps": 2000, "global_batch_size": 16, "log_every_steps": 100},
    "finetune": {"num_epochs": None, "eval_every_epochs": 1, "eval_min_steps": 2,
                 "early_stopping_evals": 3,
                 "early_stopping_min_steps": 20,
                 "prompt": {"length": 20}},
    "checkpoint": {"every_steps": 1000},
    "optim": {"warmup_steps": 4},
    "data": {"seq_len": 80, "num_eval_batches": 2},
    "evaluation": {"num_generate_examples": 0, "num_eval_batches": 4,
                   "zero_shot_tasks": ("ft_embedded_xsc_xde",), "few_shot": ()},
}


def get_config():
    s = ml_collections.ConfigDict()
    s.name = "tiny"
    s.task = "ft_embedded_xen_xde"
    s.pretrain = dict(
        config="configs/tiny_ul2.py",
        # Model shapes (config.model keys) by name; 'tiny' is the size table's row.
        sizes={
            "xxs": dict(size="tiny", num_layers=1, d_model=32, num_heads=1, head_dim=32,
                        mlp_dim=128),
            "xs": dict(size="tiny", num_layers=2, d_model=48, num_heads=2, head_dim=24,
                       mlp_dim=192),
            "s": dict(size="tiny", num_layers=3, d_model=96, num_heads=3, head_dim=32,
                      mlp_dim=384),
        },
        # Its checkpoints make the pretraining-data sweep, and the PET-size sweep is run on it:
        # the middle size, so that most runs are cheap (s finetunes at about twice xs's cost).
        anchor_size="xs",
        num_steps=300,
        checkpoints=(150,),  # and the last step
        overrides={"train": {"eval_every_steps": 150, "log_every_steps": 50},
                   "optim": {"warmup_steps": 30},
                   "data": {"bitext_rate": 0.25}},
    )
    s.finetune = dict(
        configs={"fmt": "configs/tiny_fmt.py", "lora": "configs/tiny_lora.py",
                 "prompt": "configs/tiny_prompt.py"},
        methods=("fmt", "lora", "prompt"),
        data_sizes=(1, 5, 20, 100),
        pet_sizes={"lora": (1, 4), "prompt": (5, 20)},
        seeds=(0, 1),
        overrides=FINETUNE_PROTOCOL,
    )
    # Held out of every fit, to test extrapolation (values of the grid, or 'max' / 'min').
    s.heldout = dict(finetune_examples="max", model_size="max")
    s.fit = dict(laws=("multiplicative", "additive"), preset="paper", bootstrap=200, seed=0)
    return s
