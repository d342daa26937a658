"""jprompt: visual prompting (VP, VPT, PGN, AdaViPro) of frozen vision transformers in JAX/Flax.

Importing ``jprompt`` loads nothing else. The pieces for your own JAX code, none of which loads
TensorFlow or the trainer:

- ``jprompt.models.vit``: the ViT, prompts as call arguments; ``clip``: CLIP's towers;
  ``backbone.Backbone``: a module with its image size and pixel normalization;
  ``backbones.build``: one by name from a checkpoint.
- ``jprompt.methods``: one module per method (``vp``, ``vpt``, ``pgn``, ``adavipro``,
  ``linear``, ``finetune``), each a ``base.Method`` (``init`` or ``from_arrays``, ``apply``);
  ``pgn.PromptGenerator``, the PGN generator on its own; ``heads``: linear and zero-shot heads;
  ``gumbel``: the Gumbel-softmax sampler; ``inversion``: PGN prompts as RGB pixels.
- ``jprompt.data.normalization``: the input normalizations; ``presets``: the datasets the papers
  use, their splits, class names and CLIP templates.
- ``jprompt.deploy.client``: a deployed PGN's client.

Training (``jprompt.train``, ``python -m jprompt.main``) builds on them with tf.data and orbax.
"""
