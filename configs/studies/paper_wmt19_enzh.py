"""The paper's WMT19 En-Zh study (Table 1b): bilingual En-Zh models pretrained 98K steps, the 1B
model's checkpoints at 84B, 105B, 126B, 147B, 167B* and 206B tokens; FMT on 1M-25M examples.

python -m scaling.study --config=configs/studies/paper_wmt19_enzh.py --workdir=gs://BUCKET/enzh --plan
"""

from pathlib import Path

from scaling.study import load_module


def get_config():
    ende = load_module(Path(__file__).with_name("paper_wmt14_ende.py"))
    return ende.study(
        name="paper_wmt19_enzh", task="ft_wmt19_enzh", pretrain_task="ul2_wiki40b_enzh",
        pretrain_steps=98_000, checkpoints=(40_000, 50_000, 60_000, 70_000, 80_000),
        held_step=80_000,
        fmt_data=(1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000, 10_000_000,
                  15_000_000, 20_000_000, 25_000_000))
