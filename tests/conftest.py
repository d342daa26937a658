"""Test setup: 8 fake CPU devices, so data-parallel code paths run on one machine.

XLA reads the flag once, when JAX first creates its CPU client, so this must run before any
test module touches a device.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow is used only for input pipelines; keep it off any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import pytest  # noqa: E402  (after the environment setup above, on purpose)


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """A tfds data_dir with the offline ``shapes`` (source) and demo (target) datasets."""
    import tensorflow_datasets as tfds

    import jprompt.data.synthetic  # noqa: F401  (registers the builder)
    from jprompt import config_lib

    data_dir = tmp_path_factory.mktemp("tfds")
    for name in ("jprompt_shapes/shapes", config_lib.DEMO_DATASET):
        tfds.builder(name, data_dir=str(data_dir)).download_and_prepare()
    return data_dir
