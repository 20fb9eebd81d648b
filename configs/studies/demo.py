"""A small study that shows the report end to end (what `make demo` runs): tiny.py's two
smaller sizes pretrained for 200 steps, one extra pretraining checkpoint, three finetuning-data
sizes over two decades (1 to 100 examples), one data subset and one PET size per method, all
three methods in the paper's protocol (configs/studies/tiny.py), the multiplicative law. Too
few runs for every finding (with one seed, each finetuning size has three matched pairs of
runs, fewer than a verdict needs); its time on two CPU cores and what it found are in
benchmarks/RESULTS_study.md.

python -m scaling.study --config=configs/studies/demo.py --workdir=runs/demo --executor=pool
"""

from pathlib import Path

from scaling.study import load_config_file


def get_config():
    s = load_config_file(Path(__file__).with_name("tiny.py"))
    s.name = "demo"
    s.pretrain.sizes = {"xxs": s.pretrain.sizes["xxs"].to_dict(),
                        "xs": s.pretrain.sizes["xs"].to_dict()}
    s.pretrain.anchor_size = "xs"
    s.pretrain.num_steps = 200
    s.pretrain.checkpoints = (100,)
    s.pretrain.overrides.train.eval_every_steps = 250  # dev loss at the last step only
    s.finetune.data_sizes = (1, 10, 100)
    s.finetune.pet_sizes = {"lora": (4,), "prompt": (20,)}
    s.finetune.seeds = (0,)
    s.heldout = dict(finetune_examples="max")
    s.fit.laws = ("multiplicative",)  # the law the findings test (make study-tiny adds more)
    s.fit.bootstrap = 200
    return s
