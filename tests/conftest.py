"""Test-wide set-up: eight fake CPU devices, so mesh tests run anywhere (T5X's habit)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Vocabularies trained by tests (and by the runs tests start) stay out of the user's cache.
if "UL2_LM_CACHE" not in os.environ:
    import tempfile

    os.environ["UL2_LM_CACHE"] = tempfile.mkdtemp(prefix="ul2_lm_test_cache_")
