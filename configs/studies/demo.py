"""A small study that shows the report end to end (what `make demo` runs): two tiny sizes,
one extra pretraining checkpoint, four finetuning-data sizes over two decades (2 to 200
examples), one data subset and one PET size per method, all three methods in the paper's
protocol (configs/studies/tiny.py). Too few runs for every finding (with one seed, each
finetuning size has three matched pairs of runs, fewer than a verdict needs); its time on two
CPU cores and what it found are in benchmarks/RESULTS_study.md.

python -m scaling.study --config=configs/studies/demo.py --workdir=runs/demo --executor=pool
"""

from pathlib import Path

from scaling.study import load_config_file


def get_config():
    s = load_config_file(Path(__file__).with_name("tiny.py"))
    s.name = "demo"
    s.pretrain.sizes = {"xs": s.pretrain.sizes["xs"].to_dict(),
                        "s": s.pretrain.sizes["s"].to_dict()}
    s.pretrain.anchor_size = "s"
    s.pretrain.num_steps = 300
    s.pretrain.checkpoints = (150,)
    s.finetune.data_sizes = (2, 10, 50, 200)
    s.finetune.pet_sizes = {"lora": (4,), "prompt": (20,)}
    s.finetune.seeds = (0,)
    s.heldout = dict(finetune_examples="max")
    s.fit.bootstrap = 200
    return s
