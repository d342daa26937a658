r"""Deploying a PGN as plain RGB: the client that builds prompted images, and a model server.

The PGN papers' deployment story: the frozen model sits behind an inference API that only
takes images; the client runs the small PGN and sends an image that already carries the prompt
(``jprompt.methods.inversion`` explains the geometry and the solve). Here:

- ``ClientModel``: what the client needs, exported from a trained deployable PGN as one small
  standalone ``.npz`` (generator parameters and BN statistics, token library, the precomputed
  inversion ``pinv(W)``, ``W`` and ``b + pos_j`` for the K prompt slots, geometry, input
  normalization, fill value). Loading it needs no backbone.
- ``deploy(client, images)``: uint8 images -> prompted uint8 images, ``rows * P`` taller.
- ``ServedModel``: the frozen backbone with its head (the linear head trained next to the PGN or
  CLIP's zero-shot head), knowing nothing about PGN: it accepts images at its resolution or
  taller by whole patch rows, for which it extends its position table by edge padding.
- ``make_server``: that model behind ``POST /predict`` (a PNG file in, JSON out) on 127.0.0.1,
  stdlib ``http.server`` only.

Command line (``--config`` and ``--workdir`` name a trained run, as for ``jprompt.main``)::

    python -m jprompt.deploy.serve --mode=export --config=CONFIG --workdir=W --client_file=pgn.npz
    python -m jprompt.deploy.serve --mode=serve --config=CONFIG --workdir=W --port=8000
    python -m jprompt.deploy.serve --mode=client --client_file=pgn.npz --image=photo.png \
        --url=http://127.0.0.1:8000/predict [--prompted_out=prompted.png]
"""

import functools
import http.server
import json
import urllib.request
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath
from flax import struct, traverse_util
from ml_collections import config_flags

from jprompt.data import pipeline, preprocess, presets
from jprompt.methods import heads, inversion, pgn
from jprompt.models.backbones import Backbone
from jprompt.models.resnet import ResNet10
from jprompt.train import trainer

PREDICT_PATH = "/predict"


# --- Client --------------------------------------------------------------------------------------


@struct.dataclass
class ClientModel:
    """A trained deployable PGN's client side: everything but the backbone."""

    generator: dict  # {"params", "batch_stats"} of the ResNet-10
    library: jax.Array  # (N, D)
    inverse: inversion.Inverse
    geometry: inversion.Geometry = struct.field(pytree_node=False)
    normalization: str = struct.field(pytree_node=False)

    @classmethod
    def from_pgn(cls, method: pgn.PromptGenerationNetwork, trained: dict, frozen: dict):
        if not method.deployable:
            raise ValueError("only a PGN trained with deployable=True can be deployed as RGB")
        params = trained["params"]
        generator = {
            "params": params["generator"],
            "batch_stats": trained["batch_stats"]["generator"],
        }
        return cls(
            generator=jax.device_get(generator),
            library=jax.device_get(params["library"]),
            inverse=inversion.Inverse.of(jax.device_get(frozen["backbone"]), method.geometry),
            geometry=method.geometry,
            normalization=method.backbone.normalization,
        )

    def prompts(self, normalized_images: jax.Array) -> jax.Array:
        """``(B, K, D)`` prompt tokens, as the PGN computes them at evaluation."""
        num_tokens, library_size = self.geometry.num_tokens, self.library.shape[0]
        generator = ResNet10(num_outputs=num_tokens * library_size)
        logits = generator.apply(self.generator, normalized_images, train=False)
        logits = logits.reshape(-1, num_tokens, library_size)
        return pgn.mix_library(logits, self.library)[0]

    def save(self, path) -> None:
        arrays = traverse_util.flatten_dict(
            {"generator": self.generator, "library": self.library, "inverse": vars(self.inverse)},
            sep="/",
        )
        meta = {
            "grid": self.geometry.grid,
            "patch_size": self.geometry.patch_size,
            "num_tokens": self.geometry.num_tokens,
            "normalization": self.normalization,
            "fill_value": inversion.FILL_VALUE,
        }
        with epath.Path(path).open("wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in {**arrays, **meta}.items()})

    @classmethod
    def load(cls, path) -> "ClientModel":
        with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
            flat = {key: data[key] for key in data.files}
        fill_value = int(flat.pop("fill_value"))
        if fill_value != inversion.FILL_VALUE:
            raise ValueError(
                f"{path} has filler value {fill_value}, but deployable PGNs train with "
                f"{inversion.FILL_VALUE}"
            )
        geometry = inversion.Geometry(
            *(int(flat.pop(key)) for key in ("grid", "patch_size", "num_tokens"))
        )
        normalization = str(flat.pop("normalization"))
        tree = traverse_util.unflatten_dict(
            {key: jnp.asarray(value) for key, value in flat.items()}, sep="/"
        )
        return cls(
            generator=tree["generator"],
            library=tree["library"],
            inverse=inversion.Inverse(**tree["inverse"]),
            geometry=geometry,
            normalization=normalization,
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
    size = client.geometry.grid * client.geometry.patch_size
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


# --- Server --------------------------------------------------------------------------------------


@struct.dataclass
class ServedModel:
    """The frozen backbone and its head; nothing about PGN."""

    params: dict  # the backbone's parameters, as trained with
    head_params: dict  # {"head": linear head} or {} (as in a method's trained params)
    head_frozen: dict  # {"zeroshot_head": ...} or {} (as in a method's frozen tree)
    backbone: Backbone = struct.field(pytree_node=False)
    class_names: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def from_trained(cls, backbone: Backbone, trained: dict, frozen: dict, class_names=()):
        """The head of a method's state: a trained linear head, else the frozen zero-shot one."""
        head_params = {k: v for k, v in trained["params"].items() if k == "head"}
        head_frozen = {k: v for k, v in frozen.items() if k == "zeroshot_head"}
        return cls(
            jax.device_get(frozen["backbone"]),
            jax.device_get(head_params),
            jax.device_get(head_frozen),
            backbone,
            class_names,
        )

    def logits(self, images) -> jax.Array:
        """RGB images in [0, 255] (uint8 or float), ``(B, S + rows P, S, 3)`` -> logits."""
        size, patch = self.backbone.image_size, self.backbone.module.patch_size
        height, width = np.shape(images)[1:3]
        if width != size or height < size or height % patch:
            raise ValueError(
                f"expected images {size} wide and {size} + a multiple of {patch} high, got "
                f"{height}x{width}"
            )
        return _served_logits(self, jnp.asarray(images))

    @classmethod
    def from_experiment(cls, experiment: trainer.Experiment, trained: dict) -> "ServedModel":
        """The backbone and head of a run (``trainer.restore_best``), with its dataset's class
        names."""
        data = experiment.config.dataset
        info = pipeline.dataset_info(
            data.name, data.train_split, data_dir=data.data_dir or None, label_map=data.label_map
        )
        return cls.from_trained(
            experiment.method.backbone, trained, experiment.frozen, info.class_names
        )


@jax.jit
def _served_logits(model: ServedModel, images: jax.Array) -> jax.Array:
    backbone = model.backbone
    grid = backbone.image_size // backbone.module.patch_size
    rows = images.shape[1] // backbone.module.patch_size - grid
    params = inversion.with_extra_rows(model.params, grid, rows)
    features, _ = backbone.features(params, inversion.normalize(images, backbone.normalization))
    return heads.head_logits(model.head_params, model.head_frozen, features)


def encode_png(image) -> bytes:
    return tf.io.encode_png(np.asarray(image, np.uint8)).numpy()


def make_server(model: ServedModel, port: int = 0) -> http.server.HTTPServer:
    """An HTTP server on 127.0.0.1 (``port=0``: any free port, see ``server.server_port``).

    ``POST /predict`` with a PNG file as the body answers ``{"top_class", "class_name",
    "probabilities"}``; a bad image gets a 400 with ``{"error"}``. Run ``serve_forever()``.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != PREDICT_PATH:
                return self._reply(404, {"error": f"POST images to {PREDICT_PATH}"})
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                image = preprocess.decode_image(tf.constant(body)).numpy()
                logits = model.logits(image[None])[0]
            except (ValueError, tf.errors.InvalidArgumentError) as error:
                return self._reply(400, {"error": str(error)})
            probabilities = np.asarray(jax.nn.softmax(logits))
            top = int(probabilities.argmax())
            names = model.class_names
            return self._reply(
                200,
                {
                    "top_class": top,
                    "class_name": names[top] if names else str(top),
                    "probabilities": probabilities.tolist(),
                },
            )

        def _reply(self, status: int, payload: dict):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            logging.info("%s " + format, self.address_string(), *args)

    return http.server.HTTPServer(("127.0.0.1", port), Handler)


def query(url: str, png: bytes, *, timeout: float = 60.0) -> dict:
    """POST a PNG to a ``make_server`` endpoint; its JSON answer."""
    request = urllib.request.Request(url, data=png, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


# --- From a trained run --------------------------------------------------------------------------


def _define_flags() -> None:
    """The command line's flags; defined only when run as a script, so that importing this
    module next to another absl program (the benchmarks do) defines none."""
    flags.DEFINE_enum("mode", None, ["export", "serve", "client"], "What to run.")
    config_flags.DEFINE_config_file("config", None, "Config of the trained run.")
    flags.DEFINE_string("workdir", None, "Work directory of the trained run.")
    flags.DEFINE_string("client_file", None, "The exported client .npz.")
    flags.DEFINE_integer("port", 8000, "serve: port on 127.0.0.1.")
    flags.DEFINE_string("image", None, "client: the image file to classify.")
    flags.DEFINE_string("url", f"http://127.0.0.1:8000{PREDICT_PATH}", "client: endpoint.")
    flags.DEFINE_string("prompted_out", None, "client: also save the prompted PNG.")
    flags.mark_flag_as_required("mode")


def _at_model_size(
    image: tf.Tensor, size: int, crop: str = "resize", resize: str = preprocess.DEFAULT_RESIZE
) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> uint8 ``(size, size, 3)``, as the evaluation pipeline crops."""
    if tuple(image.shape[:2]) != (size, size):
        image = tf.round(preprocess.EVAL_CROPS[crop](image, size, resize))
    return np.asarray(image, np.uint8)


def _client_image(path: str, size: int) -> np.ndarray:
    """An image file -> uint8 ``(size, size, 3)``, resized as the evaluation pipeline does."""
    return _at_model_size(preprocess.decode_image(tf.constant(epath.Path(path).read_bytes())), size)


def dataset_images(config, split: str, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` (default: all) images of ``split`` of ``config``'s dataset, with their
    labels, as a client of the served model sends them: uint8 at the model's resolution,
    cropped as the evaluation pipeline does, not normalized."""
    data = config.dataset
    example_map = presets.example_map(data.label_map)
    builder = pipeline.load_builder(data.name, data.data_dir or None)
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={example_map.image_key: tfds.decode.SkipDecoding()},
    )
    images, labels = [], []
    for example in ds.take(-1 if count is None else count):
        encoded, label = example_map.fn(example)
        image = example_map.decode(encoded)
        inputs = config.input
        images.append(_at_model_size(image, inputs.image_size, inputs.eval_crop, inputs.resize))
        labels.append(int(label))
    return np.stack(images), np.array(labels, np.int32)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    mode = args.mode
    if mode in ("export", "serve"):
        experiment, trained = trainer.restore_best(args.config, args.workdir)
        if mode == "export":
            client = ClientModel.from_pgn(experiment.method, trained, experiment.frozen)
            client.save(args.client_file)
            print(f"Wrote {args.client_file}")
            return
        server = make_server(ServedModel.from_experiment(experiment, trained), args.port)
        print(f"Serving on http://127.0.0.1:{server.server_port}{PREDICT_PATH}", flush=True)
        server.serve_forever()
        return
    client = ClientModel.load(args.client_file)
    size = client.geometry.grid * client.geometry.patch_size
    png = encode_png(deploy(client, _client_image(args.image, size)[None]).images[0])
    if args.prompted_out:
        epath.Path(args.prompted_out).write_bytes(png)
    answer = query(args.url, png)
    print(
        f"{answer['class_name']} (class {answer['top_class']}, p = "
        f"{answer['probabilities'][answer['top_class']]:.3f})"
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
