"""Test setup: 8 fake CPU devices, so data-parallel code paths run on one machine, programs
compiled for compile time over run time, and one persistent compilation cache for the run.

XLA reads the flag once, when JAX first creates its CPU client, so this must run before any
test module touches a device.
"""

import atexit
import os
import shutil
import tempfile

# The suite's time goes to compiling hundreds of small programs more than to running them, so
# LLVM's optimisation level 0 (the same XLA programs, less optimised machine code) makes it
# faster. Run time matters in the benchmarks, which keep the default.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow is used only for input pipelines; keep it off any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Many tests compile the same programs (the demo configs' steps): one persistent compilation
# cache for the whole run, which the pytest-xdist workers and the subprocesses tests start
# inherit through the environment, and which the process that made it removes at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jprompt-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402  (after the environment setup above, on purpose)


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """A tfds data_dir with the offline ``shapes`` (source) and demo (target) datasets."""
    import tensorflow_datasets as tfds

    import jprompt.data.synthetic  # noqa: F401  (registers the builder)
    from jprompt.train import config_lib

    data_dir = tmp_path_factory.mktemp("tfds")
    for name in ("jprompt_shapes/shapes", config_lib.DEMO_DATASET):
        tfds.builder(name, data_dir=str(data_dir)).download_and_prepare()
    return data_dir
