"""The shipped demo backbone is a real pretrained model: it classifies its source task well."""

import jax
import numpy as np

from jprompt.data import pipeline
from jprompt.data.preprocess import PreprocessSpec
from jprompt.models import backbones, vit, vit_checkpoint
from jprompt.train import config_lib


def test_shipped_backbone_classifies_its_source_task(shapes_data_dir):
    flat = np.load(config_lib.DEMO_CHECKPOINTS[config_lib.DEMO_BACKBONE])
    assert flat["head/kernel"].shape == (64, 10)  # the source task's 10 shape classes
    model = vit.create(config_lib.DEMO_BACKBONE, num_classes=10)
    params = vit_checkpoint.load_pretrained(
        config_lib.DEMO_CHECKPOINTS[config_lib.DEMO_BACKBONE], model, image_size=32
    )
    spec = PreprocessSpec(32, normalization=backbones.VIT_NORMALIZATION)
    batches = pipeline.eval_iterator(
        "jprompt_shapes/shapes",
        "test",
        global_batch_size=250,
        spec=spec,
        data_dir=str(shapes_data_dir),
        process_index=0,
        process_count=1,
    )
    predict = jax.jit(lambda images: model.apply({"params": params}, images)[0].argmax(-1))
    correct = total = 0
    for batch in batches:
        hits = (np.asarray(predict(batch["image"])) == batch["label"]) * batch["mask"]
        correct += hits.sum()
        total += batch["mask"].sum()
    assert total == 1000
    # pretrain_tiny.py reported 0.441 on this split for the shipped file; chance is 0.10.
    np.testing.assert_allclose(correct / total, 0.441, atol=0.005)
