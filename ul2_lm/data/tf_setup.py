"""TensorFlow as the data modules use it: quiet, and kept off the accelerators JAX owns."""

import contextlib
import logging
import os
import re
import sys
import tempfile

_done = False

# What TensorFlow's native code prints while it loads on a machine without CUDA: the banner of
# absl's pre-initialisation logging, the CUDA runtime stub and the failed cuInit probe. No
# environment variable silences these (they are printed before logging is set up).
_PROBING_NOISE = re.compile(r"absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc|cuInit|"
                            r"cuda_executor\.cc|Unable to register cu(DNN|FFT|BLAS) factory|"
                            r"computation placer already registered|TF-TRT Warning")


@contextlib.contextmanager
def _filtered_native_stderr():
    """Captures what native code writes to file descriptor 2 and passes it on afterwards, less
    the CUDA probing noise; everything when the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = lines if failed else [ln for ln in lines if not _PROBING_NOISE.search(ln)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def quiet_tensorflow():
    """Call before the first TensorFlow import: silences its logging and hides GPUs from it."""
    global _done
    if _done:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # the data side does no float math
    with _filtered_native_stderr():
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        tf.get_logger().setLevel(logging.ERROR)
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # devices already initialised by someone else: nothing to hide now
            pass
    _done = True
