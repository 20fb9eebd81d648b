"""The seqio tasks: idempotent registration, the packed prefix-LM features, the same examples as
the input pipeline."""

import numpy as np
import pytest
import seqio

from ul2_lm.data import pipeline
from ul2_lm.data import tasks
from ul2_lm.data import testing


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UL2_LM_CACHE", str(tmp_path_factory.getbasetemp() / "ul2_lm_cache"))
        yield


def test_registration_is_idempotent_and_settings_get_their_own_task():
    cfg = testing.tiny_data_config()
    task = tasks.seqio_task(cfg)
    assert tasks.seqio_task(cfg) is task
    assert seqio.get_mixture_or_task(task.name) is task
    other = tasks.seqio_task(testing.tiny_data_config(ul2={"preset": "ul2", "rates": None}))
    assert other.name != task.name and other.name.startswith("ul2_embedded_ende")
    assert tasks.seqio_task(testing.tiny_data_config(ul2={"preset": "ul2", "rates": None})) is other


def test_the_seqio_task_gives_the_pipelines_examples_and_features():
    cfg = testing.tiny_data_config()
    through_seqio = list(tasks.get_dataset(cfg, split="validation").take(4).as_numpy_iterator())
    through_pipeline = next(pipeline.make_eval_iterator(cfg, global_batch_size=4))
    for i, row in enumerate(through_seqio):
        assert set(row) == set(pipeline.BATCH_FEATURES)
        for k in pipeline.BATCH_FEATURES:
            assert row[k].dtype == np.int32 and row[k].shape == (128,)
            np.testing.assert_array_equal(row[k], through_pipeline[k][i], err_msg=k)


def test_task_names_are_the_documented_ones():
    assert {"ul2_embedded_ende", "ul2_textfiles", "ul2_wiki40b_ende", "ul2_tfds"} <= set(tasks.TASKS)
    with pytest.raises(ValueError, match="ul2_c5"):
        tasks.task_spec("ul2_c5")
