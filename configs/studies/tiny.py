"""A complete miniature of the paper on a CPU: three tiny model sizes pretrained with UL2 on the
embedded corpus (their intermediate checkpoints are the pretraining-data factor), finetuned by
FMT, LoRA and prompt tuning on embedded xen->xde translation over a grid of data sizes, PET
sizes and two seeds; multiplicative and additive laws fitted with held-out points.

python -m scaling.study --config=configs/studies/tiny.py --workdir=runs/study_tiny
"""

import ml_collections


def get_config():
    s = ml_collections.ConfigDict()
    s.name = "tiny"
    s.task = "ft_embedded_xen_xde"
    s.pretrain = dict(
        config="configs/tiny_ul2.py",
        # Model shapes (config.model keys) by name; 'tiny' is the size table's row.
        sizes={
            "xs": dict(size="tiny", num_layers=2, d_model=64, num_heads=2, mlp_dim=256),
            "s": dict(size="tiny", num_layers=3, d_model=96, num_heads=3, mlp_dim=384),
            "m": dict(size="tiny"),
        },
        anchor_size="m",  # its checkpoints make the pretraining-data sweep
        num_steps=200,
        checkpoints=(100, 150),  # and the last step
        overrides={"train": {"eval_every_steps": 100, "log_every_steps": 50},
                   "optim": {"warmup_steps": 20}},
    )
    s.finetune = dict(
        configs={"fmt": "configs/tiny_fmt.py", "lora": "configs/tiny_lora.py",
                 "prompt": "configs/tiny_prompt.py"},
        methods=("fmt", "lora", "prompt"),
        data_sizes=(50, 100, 200, 400),
        pet_sizes={"lora": (1, 4, 16), "prompt": (5, 20)},
        seeds=(0, 1),
        # Shared by every finetuning run: short, CPU-sized runs.
        overrides={
            "train": {"num_steps": 30, "global_batch_size": 16, "eval_every_steps": 15,
                      "log_every_steps": 15},
            "finetune": {"num_epochs": None, "prompt": {"length": 20}},
            "checkpoint": {"every_steps": 15},
            "optim": {"warmup_steps": 4},
            "data": {"seq_len": 96},
            "evaluation": {"num_generate_examples": 16, "max_new_tokens": 32,
                           "zero_shot_tasks": (), "few_shot": ()},
        },
    )
    # Held out of every fit, to test extrapolation (values of the grid, or 'max' / 'min').
    s.heldout = dict(finetune_examples="max", model_size="max")
    s.fit = dict(laws=("multiplicative", "additive"), preset="paper", bootstrap=200, seed=0)
    return s
