"""TensorFlow as the data modules use it: quiet, and kept off the accelerators JAX owns."""

import logging
import os

_done = False


def quiet_tensorflow():
    """Call before the first TensorFlow import: silences its logging and hides GPUs from it."""
    global _done
    if _done:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # the data side does no float math
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.get_logger().setLevel(logging.ERROR)
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialised by someone else: nothing to hide now
        pass
    _done = True
