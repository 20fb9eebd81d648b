"""The paper's full WMT14 En-De study (Table 1b): 1B-16B models, intermediate checkpoints of
the 1B model as the pretraining-data factor, FMT / LoRA / prompt tuning over the paper's
finetuning-data, LoRA-rank and prompt-length grids, three data subsets each; starred values
held out. Plan it before paying for it:

python -m scaling.study --config=configs/studies/paper_wmt14_ende.py --workdir=gs://BUCKET/ende --plan
"""

import ml_collections

# 2^21 tokens per pretraining step: 84B, 126B, 167B, 209B* and 283B tokens, rounded to steps.
PRETRAIN_STEPS = 135_000
CHECKPOINTS = (40_000, 60_000, 80_000, 100_000)
PET_DATA = (8_000, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 70_000, 80_000, 90_000,
            100_000)


def study(name="paper_wmt14_ende", task="ft_wmt14_ende", pretrain_task="ul2_wiki40b_ende",
          pretrain_steps=PRETRAIN_STEPS, checkpoints=CHECKPOINTS, held_step=100_000,
          fmt_data=(100_000, 500_000) + tuple(range(1_000_000, 4_500_001, 500_000))):
    s = ml_collections.ConfigDict()
    s.name = name
    s.task = task
    s.pretrain = dict(
        config="configs/1b_ul2.py",
        sizes={size: dict(size=size) for size in ("1b", "2b", "4b", "8b", "16b")},
        anchor_size="1b",
        num_steps=pretrain_steps,
        checkpoints=checkpoints,
        overrides={"data": {"task": pretrain_task}},
    )
    s.finetune = dict(
        configs={"fmt": "configs/1b_fmt.py", "lora": "configs/1b_lora.py",
                 "prompt": "configs/1b_prompt.py"},
        methods=("fmt", "lora", "prompt"),
        data_sizes={"fmt": fmt_data, "lora": PET_DATA, "prompt": PET_DATA},
        pet_sizes={"lora": (4, 8, 16, 32, 48, 64, 128),
                   "prompt": (50, 100, 150, 200, 300, 400, 600)},
        seeds=(0, 1, 2),
        overrides={},
    )
    s.heldout = dict(model_size="16b", pretrain_step=held_step, pet_size="max",
                     finetune_examples="max")
    s.fit = dict(laws=("multiplicative", "additive"), preset="paper", bootstrap=1000, seed=0)
    return s


def get_config():
    return study()
