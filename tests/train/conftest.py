"""Engine tests compile the same tiny steps many times: share XLA's persistent compilation cache."""

import os
import tempfile

import jax

_CACHE = os.path.join(tempfile.gettempdir(), "cnnjax_test_jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
