"""The paper's multilingual summarisation study (MLSum De/Es/Fr + CNN/DailyMail, Table 1b) on the
En-De models: FMT on 100K-900K examples, PET on 8K-100K.

python -m scaling.study --config=configs/studies/paper_mlsum.py --workdir=gs://BUCKET/mlsum --plan
"""

from pathlib import Path

from scaling.study import load_module


def get_config():
    ende = load_module(Path(__file__).with_name("paper_wmt14_ende.py"))
    s = ende.study(name="paper_mlsum", task="ft_mlsum_cnndm",
                   fmt_data=tuple(range(100_000, 900_001, 100_000)))
    # Prompted articles are long: the paper's 2048-token sequences.
    s.finetune.overrides = {"data": {"seq_len": 2048}, "evaluation": {"max_new_tokens": 256}}
    return s
