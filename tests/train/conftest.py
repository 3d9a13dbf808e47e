"""Engine tests compile the same tiny steps many times: share XLA's persistent compilation cache."""

import os
import tempfile

import jax

_CACHE = os.path.join(tempfile.gettempdir(), "cnnjax_test_jax_cache")
# Subprocesses started by the tests (4-device runs, experiments.train) use the same cache.
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": _CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
