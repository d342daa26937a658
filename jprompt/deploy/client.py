r"""The PGN client: images in, prompted RGB images out, for a server that only takes images.

The PGN papers' deployment story: the frozen model sits behind an inference API that only
takes images; the client runs the small PGN and sends an image that already carries the prompt
(``jprompt.methods.inversion`` explains the geometry and the solve). Pure JAX, NumPy and PIL:
importing this module loads neither TensorFlow nor the trainer.

- ``ClientModel``: what the client needs, exported from a trained deployable PGN as one small
  standalone ``.npz`` (generator parameters and BN statistics, token library, the precomputed
  inversion ``pinv(W)``, ``W`` and ``b + pos_j`` for the K prompt slots, geometry, input
  normalization, the evaluation crop, fill value). Loading it needs no backbone.
- ``ClientModel.prepare``: any uint8 image -> the model-sized window the evaluation pipeline
  crops (``jprompt.data.crops``, the pipeline's own sizes and offsets).
- ``deploy(client, images)``: uint8 images -> prompted uint8 images, ``rows * P`` taller.
- ``encode_png``, ``read_image`` and ``query``: the bytes that travel to ``jprompt.deploy.server``.
"""

import functools
import io
import json
import urllib.request
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import struct, traverse_util
from PIL import Image

from jprompt.data import crops
from jprompt.data import normalization as normalizations
from jprompt.errors import InputError
from jprompt.methods import inversion, pgn

# jax.image.resize's names of the kernels in crops.RESIZES; its scale-and-translate resize is
# the one tf.image.resize runs, so the client's window matches the pipeline's.
_JAX_KERNELS = {"bilinear": "linear", "bicubic": "cubic"}
_META = ("grid", "patch_size", "num_tokens", "normalization", "eval_crop", "resize", "fill_value")
_ARRAYS = ("params/library", "inverse/kernel", "inverse/pinv", "inverse/offsets")
_WHAT = "a PGN client file (an .npz written by python -m jprompt.deploy --mode=export)"


def at_model_size(image, size: int, crop: str, resize: str) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> uint8 ``(size, size, 3)``: the evaluation pipeline's ``crop`` and
    ``resize`` (``jprompt.data.preprocess.eval_crop``), rounded to 8 bits."""
    image = np.asarray(image)
    height, width, top, left = crops.eval_window(image.shape[0], image.shape[1], size, crop)
    kernel, antialias = crops.RESIZES[resize]
    resized = jax.image.resize(
        jnp.asarray(image, jnp.float32), (height, width, 3), _JAX_KERNELS[kernel], antialias
    )
    return np.asarray(inversion.quantize(resized[top : top + size, left : left + size]))


@struct.dataclass
class ClientModel:
    """A trained deployable PGN's client side: everything but the backbone and the head."""

    params: dict  # {"generator", "library"}: a pgn.PromptGenerator's arrays
    batch_stats: dict  # {"generator"}
    inverse: inversion.Inverse
    geometry: inversion.Geometry = struct.field(pytree_node=False)
    normalization: str = struct.field(pytree_node=False)
    eval_crop: str = struct.field(pytree_node=False)  # how the run's evaluation crops images
    resize: str = struct.field(pytree_node=False)

    @classmethod
    def from_pgn(cls, method, trained: dict, frozen: dict, *, eval_crop: str, resize: str):
        """The client of a trained ``PromptGenerationNetwork(deployable=True)``; ``eval_crop``
        and ``resize`` are its run's ``config.input`` fields. InputError for another method."""
        is_pgn = isinstance(method, pgn.PromptGenerationNetwork)
        if not (is_pgn and method.deployable):
            what = (
                "a PGN trained without deployable" if is_pgn else f"a {type(method).__name__} run"
            )
            raise InputError(
                f"cannot deploy {what}: only a PGN trained with deployable can be deployed as "
                "RGB prompts (train one with --config=configs/pgn.py:...,deployable)"
            )
        crops.check(eval_crop, resize)
        params = trained["params"]
        return cls(
            params=jax.device_get({k: params[k] for k in ("generator", "library")}),
            batch_stats=jax.device_get(trained["batch_stats"]),
            inverse=inversion.Inverse.of(jax.device_get(frozen["backbone"]), method.geometry),
            geometry=method.geometry,
            normalization=method.backbone.normalization,
            eval_crop=eval_crop,
            resize=resize,
        )

    @property
    def size(self) -> int:
        """The model's image side S."""
        return self.geometry.grid * self.geometry.patch_size

    @property
    def generator(self) -> pgn.PromptGenerator:
        library_size, token_dim = self.params["library"].shape
        return pgn.PromptGenerator(self.geometry.num_tokens, library_size, token_dim)

    def prompts(self, normalized_images: jax.Array) -> jax.Array:
        """``(B, K, D)`` prompt tokens, as the PGN computes them at evaluation."""
        return self.generator(self.params, self.batch_stats, normalized_images)[0]

    def prepare(self, image) -> np.ndarray:
        """Any uint8 ``(H, W, 3)`` image -> the uint8 ``(S, S, 3)`` window its run evaluates."""
        return at_model_size(image, self.size, self.eval_crop, self.resize)

    def save(self, path) -> None:
        arrays = traverse_util.flatten_dict(
            {"params": self.params, "batch_stats": self.batch_stats, "inverse": vars(self.inverse)},
            sep="/",
        )
        meta = {
            "grid": self.geometry.grid,
            "patch_size": self.geometry.patch_size,
            "num_tokens": self.geometry.num_tokens,
            "normalization": self.normalization,
            "eval_crop": self.eval_crop,
            "resize": self.resize,
            "fill_value": inversion.FILL_VALUE,
        }
        with epath.Path(path).open("wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in {**arrays, **meta}.items()})

    @classmethod
    def load(cls, path) -> "ClientModel":
        """The client saved at ``path``; an InputError names the file unless it is one."""
        path = epath.Path(path)
        if not path.is_file():
            raise InputError(f"{path} does not exist; expected {_WHAT}")
        try:
            with path.open("rb") as f:
                data = np.load(f, allow_pickle=False)
                if not isinstance(data, np.lib.npyio.NpzFile):  # a single .npy array
                    raise ValueError(path)
                with data:
                    flat = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            raise InputError(
                f"{path} is not an .npz archive numpy can read; expected {_WHAT}"
            ) from None
        missing = [key for key in _META + _ARRAYS if key not in flat]
        if missing or not any(key.startswith("params/generator/") for key in flat):
            raise InputError(f"{path} is not {_WHAT}: it lacks {missing or 'the generator'}")
        meta = {key: flat.pop(key).item() for key in _META}
        if meta["fill_value"] != inversion.FILL_VALUE:
            raise InputError(
                f"{path} has filler value {meta['fill_value']}, but deployable PGNs train with "
                f"{inversion.FILL_VALUE}"
            )
        geometry = inversion.Geometry(meta["grid"], meta["patch_size"], meta["num_tokens"])
        try:
            normalizations.affine(meta["normalization"])
            crops.check(meta["eval_crop"], meta["resize"])
        except ValueError as error:
            raise InputError(f"{path} is damaged: {error}") from None
        tree = traverse_util.unflatten_dict(
            {key: jnp.asarray(value) for key, value in flat.items()}, sep="/"
        )
        inverse = inversion.Inverse(**tree.pop("inverse"))
        dim = tree["params"]["library"].shape[-1]
        shapes = (inverse.kernel.shape, inverse.offsets.shape)
        if shapes != ((dim, geometry.patch_dim), (geometry.num_tokens, dim)):
            raise InputError(f"{path} is damaged: its arrays' shapes disagree with its geometry")
        return cls(
            params=tree["params"],
            batch_stats=tree["batch_stats"],
            inverse=inverse,
            geometry=geometry,
            normalization=str(meta["normalization"]),
            eval_crop=str(meta["eval_crop"]),
            resize=str(meta["resize"]),
        )


class Prompted(NamedTuple):
    """``deploy``'s result: the image to send, the stages before it, and the solve's report."""

    images: jax.Array  # (B, H + rows P, W, 3) uint8: in_range rounded, what is sent
    in_range: jax.Array  # float RGB after the box projection: inside [0, 255]
    min_norm: jax.Array  # float RGB of the minimum-norm solution: exact, may leave [0, 255]
    residual: jax.Array  # (B,) largest |W x - t| of in_range's prompt patches
    exact: jax.Array  # (B,) whether that residual is within inversion.EXACT_RTOL


def deploy(client: ClientModel, images, *, iterations: int = inversion.BOX_ITERATIONS) -> Prompted:
    """uint8 ``(B, S, S, 3)`` images -> their prompted versions (see ``Prompted``).

    Logs a warning for images whose prompt has no in-range exact solution.
    """
    images = np.asarray(images)
    size = client.size
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"expected uint8 images of shape (B, {size}, {size}, 3), got {images.dtype} "
            f"{images.shape}"
        )
    prompted = _deploy(client, images, iterations)
    missed = np.flatnonzero(~np.asarray(prompted.exact))
    if missed.size:
        logging.warning(
            "%d of %d images have no in-range exact prompt solution after %d iterations "
            "(largest residual %.3g); their prompts are the closest in-range approximation",
            missed.size,
            len(images),
            iterations,
            float(np.asarray(prompted.residual)[missed].max()),
        )
    return prompted


@functools.partial(jax.jit, static_argnames="iterations")
def _deploy(client: ClientModel, images: jax.Array, iterations: int) -> Prompted:
    geometry = client.geometry
    tokens = client.prompts(inversion.normalize(images, client.normalization))
    min_norm = client.inverse.min_norm(tokens)
    bounds = inversion.pixel_bounds(client.normalization, geometry.patch_size)
    boxed, residual, exact = inversion.project_to_box(
        client.inverse, tokens, min_norm, bounds, iterations=iterations
    )

    def with_rows(patches):
        rows = inversion.patches_to_rows(patches, geometry, client.normalization)
        return jnp.concatenate([images.astype(rows.dtype), rows], axis=1)

    in_range = with_rows(boxed)
    return Prompted(inversion.quantize(in_range), in_range, with_rows(min_norm), residual, exact)


# --- The bytes that travel -----------------------------------------------------------------------


def read_image(path) -> np.ndarray:
    """An image file -> uint8 ``(H, W, 3)``: grayscale repeated, alpha dropped."""
    path = epath.Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; pass an image file (PNG, JPEG, ...)")
    try:
        with path.open("rb") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    except Exception:  # PIL raises many types for unreadable data
        raise InputError(f"{path} is not an image PIL can read (PNG, JPEG, ...)") from None


def encode_png(image) -> bytes:
    """uint8 ``(H, W, 3)`` -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def query(url: str, png: bytes, *, timeout: float = 60.0) -> dict:
    """POST a PNG to a ``jprompt.deploy.server`` endpoint; its JSON answer."""
    request = urllib.request.Request(url, data=png, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)
