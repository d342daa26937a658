r"""Convert released CLIP weights into jprompt's ``.npz`` (no torch needed).

The naming (OpenAI / open_clip, Hugging Face) and the variant (``clip_b32``, ``clip_b16``,
``clip_l14``) are read from the weights and printed with the parameter count; ``--name`` makes
the conversion fail unless the file is that variant. The ``.npz`` keeps the file's resolution
(``jprompt.models.clip_checkpoint.load`` resamples the position embedding for other image sizes)
and is what ``backbone.checkpoint`` takes. Examples:

    # OpenAI's released TorchScript file, as ``clip.load("ViT-B/32")`` downloads it
    python -m jprompt.tools.convert_clip --input=ViT-B-32.pt --output=clip_b32.npz

    # open_clip: a file from the Hub, or a training checkpoint ({"state_dict": ...})
    python -m jprompt.tools.convert_clip --input=open_clip_pytorch_model.bin --output=clip_b16.npz \
        --name=clip_b16
    python -m jprompt.tools.convert_clip --input=logs/run/checkpoints/epoch_32.pt --output=clip.npz

    # Hugging Face: model.safetensors (or pytorch_model.bin) of openai/clip-vit-large-patch14
    python -m jprompt.tools.convert_clip --input=clip-vit-large-patch14/model.safetensors \
        --output=clip_l14.npz

open_clip models trained with GELU (those without ``-quickgelu`` in their name) convert; the
weights cannot tell the activation, so run them with ``backbone.activation="gelu_exact"``
(jprompt's CLIP towers default to quick_gelu, as OpenAI's models).
"""

from absl import app, flags

from jprompt.models import clip, clip_checkpoint

_INPUT = flags.DEFINE_string("input", None, "CLIP weights: .pt/.pth/.bin, .safetensors or .npz.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write jprompt's .npz.")
_NAME = flags.DEFINE_enum("name", None, clip.NAMES, "Expected variant; default: detected.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = clip_checkpoint.convert_file(_INPUT.value, _OUTPUT.value, _NAME.value)
    print(f"naming: {result.naming}")
    print(f"variant: {result.name} at image size {result.image_size}")
    print(f"parameters: {result.num_params:,}")
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["input", "output"])
    app.run(main)
