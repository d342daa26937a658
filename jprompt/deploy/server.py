r"""The frozen model behind HTTP: ``POST /predict`` takes a PNG and answers JSON.

- ``ServedModel``: the frozen backbone with its head (the linear head trained next to the PGN or
  CLIP's zero-shot head), knowing nothing about PGN: it accepts images at its resolution or
  taller by whole patch rows, for which it extends its position table by edge padding
  (``jprompt.methods.inversion``).
- ``make_server``: that model on 127.0.0.1, stdlib ``http.server`` only, that no client can
  block: each connection has its own thread and a read timeout, and ``Limits`` bound the body
  and the image height before any pixel is decoded. Every error is a JSON ``{"error"}`` naming
  the problem in words: 400 (a bad header or image), 404, 405 (a method other than POST), 408
  (too slow), 411 (no Content-Length), 413 (a body over the limit), 500 (the model failed).
"""

import dataclasses
import http
import http.server
import io
import json
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct
from PIL import Image

from jprompt.errors import InputError
from jprompt.methods import heads, inversion
from jprompt.models.backbone import Backbone

PREDICT_PATH = "/predict"
# What a method's trees hold for its head (``jprompt.methods.base``): the served model keeps
# these beside the backbone and drops the prompt.
HEAD_PARAMS = ("head", "label_mapping")
HEAD_FROZEN = ("zeroshot_head", "source_head", "label_mapping")


@struct.dataclass
class ServedModel:
    """The frozen backbone and its head; nothing about PGN."""

    params: dict  # the backbone's parameters, as trained with
    head_params: dict  # the HEAD_PARAMS entries of a method's trained params
    head_frozen: dict  # the HEAD_FROZEN entries of a method's frozen tree
    backbone: Backbone = struct.field(pytree_node=False)
    class_names: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def from_trained(cls, backbone: Backbone, trained: dict, frozen: dict, class_names=()):
        """The head of a method's state, whichever it is (``jprompt.methods.heads.head_logits``):
        a trained linear head, the frozen zero-shot one, or a label mapping onto the backbone's
        own classifier."""
        head_params = {k: v for k, v in trained["params"].items() if k in HEAD_PARAMS}
        head_frozen = {k: v for k, v in frozen.items() if k in HEAD_FROZEN}
        return cls(
            jax.device_get(frozen["backbone"]),
            jax.device_get(head_params),
            jax.device_get(head_frozen),
            backbone,
            class_names,
        )

    def check_size(self, height: int, width: int) -> None:
        """ValueError unless an image is ``S`` wide and ``S`` + whole patch rows high."""
        size, patch = self.backbone.image_size, self.backbone.module.patch_size
        if width != size or height < size or (height - size) % patch:
            raise ValueError(
                f"expected an image {size} pixels wide and {size} + a multiple of {patch} "
                f"pixels high, got {width} wide and {height} high"
            )

    def logits(self, images) -> jax.Array:
        """RGB images in [0, 255] (uint8 or float), ``(B, S + rows P, S, 3)`` -> logits."""
        self.check_size(*np.shape(images)[1:3])
        return _served_logits(self, jnp.asarray(images))

    def heights(self, max_extra_rows: int) -> tuple[int, ...]:
        """The image heights with at most ``max_extra_rows`` patch rows below the image."""
        size, patch = self.backbone.image_size, self.backbone.module.patch_size
        return tuple(size + rows * patch for rows in range(max_extra_rows + 1))


@jax.jit
def _served_logits(model: ServedModel, images: jax.Array) -> jax.Array:
    backbone = model.backbone
    grid = backbone.image_size // backbone.module.patch_size
    rows = images.shape[1] // backbone.module.patch_size - grid
    params = inversion.with_extra_rows(model.params, grid, rows)
    features, _ = backbone.features(params, inversion.normalize(images, backbone.normalization))
    return heads.head_logits(model.head_params, model.head_frozen, features)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may take; each is checked before the next byte is read or decoded.

    The compiled programs are a fixed set: every accepted image is one image ``S`` wide and one
    of ``ServedModel.heights(max_extra_rows)`` high, so the server compiles at most
    ``max_extra_rows + 1`` programs (``warm_up`` compiles them all before serving). A height is
    not padded up to a coarser set of sizes: padded patch rows would be tokens that every other
    token attends to, which changes the logits, and the backbone has no attention mask to hide
    them; a PGN's prompt needs ``ceil(K / grid)`` rows, a few.
    """

    max_body_bytes: int = 8 * 2**20
    max_extra_rows: int = 4  # patch rows below the image
    read_timeout_s: float = 10.0  # per read of the request line and headers, and for the body

    def __post_init__(self):
        if self.max_body_bytes <= 0 or self.max_extra_rows < 0 or self.read_timeout_s <= 0:
            raise InputError(f"limits must be positive (max_extra_rows >= 0), got {self}")


def warm_up(model: ServedModel, limits: Limits) -> None:
    """Compile the model for every height the server accepts, so that no request waits on XLA."""
    size = model.backbone.image_size
    for height in model.heights(limits.max_extra_rows):
        model.logits(np.zeros((1, height, size, 3), np.uint8)).block_until_ready()


class _Rejected(Exception):
    """A request answered with ``status`` and a JSON error naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(http.server.BaseHTTPRequestHandler):
    """``POST /predict``; ``make_server`` sets the class attributes below."""

    model: ServedModel
    limits: Limits
    lock: threading.Lock  # one forward pass at a time: the device memory of one image
    timeout: float  # StreamRequestHandler's timeout of each socket read: limits.read_timeout_s

    def do_POST(self):
        try:
            image = self._image()
        except _Rejected as rejected:
            return self._reply(rejected.status, {"error": str(rejected)})
        try:
            with self.lock:
                logits = self.model.logits(image[None])[0]
                probabilities = np.asarray(jax.nn.softmax(logits))
        except Exception:
            logging.exception("the model failed on a %s image", image.shape)
            return self._reply(500, {"error": "the model failed on this image; see the log"})
        top = int(probabilities.argmax())
        names = self.model.class_names
        answer = {
            "top_class": top,
            "class_name": names[top] if names else str(top),
            "probabilities": probabilities.tolist(),
        }
        return self._reply(200, answer)

    def _not_allowed(self):
        self._reply(
            405, {"error": f"{self.command} is not supported: POST a PNG to {PREDICT_PATH}"}
        )

    do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _image(self) -> np.ndarray:
        """The request's image, uint8 ``(H, W, 3)``; ``_Rejected`` when it is not acceptable."""
        if self.path != PREDICT_PATH:
            raise _Rejected(404, f"no endpoint {self.path}: POST a PNG to {PREDICT_PATH}")
        body = self._body(self._content_length())
        try:
            image = Image.open(io.BytesIO(body))  # reads the header only
        except Image.DecompressionBombError:
            raise _Rejected(400, f"the image has far more pixels than {self._size_limit}") from None
        except Exception:  # PIL raises many types for unreadable data
            raise _Rejected(400, "the body is not an image: POST the bytes of a PNG file") from None
        width, height = image.size
        max_height = self.model.heights(self.limits.max_extra_rows)[-1]
        if height > max_height:
            raise _Rejected(400, f"the image is {height} pixels high, over {self._size_limit}")
        try:
            self.model.check_size(height, width)
        except ValueError as error:
            raise _Rejected(400, str(error)) from None
        try:
            return np.asarray(image.convert("RGB"))
        except Exception:
            raise _Rejected(400, "the image data is truncated or corrupt") from None

    @property
    def _size_limit(self) -> str:
        patch = self.model.backbone.module.patch_size
        heights = self.model.heights(self.limits.max_extra_rows)
        return (
            f"this server's limit of {heights[-1]} pixels high ({heights[0]} + "
            f"max_extra_rows = {self.limits.max_extra_rows} patch rows of {patch})"
        )

    def _content_length(self) -> int:
        text = self.headers.get("Content-Length")
        limit = self.limits.max_body_bytes
        if text is None:
            raise _Rejected(411, f"a Content-Length header is required (at most {limit} bytes)")
        text = text.strip()
        if not (text.isascii() and text.isdigit()):
            raise _Rejected(400, f"Content-Length {text!r} is not a byte count (a whole number)")
        length = int(text)
        if length > limit:
            raise _Rejected(
                413,
                f"the body of {length} bytes is over this server's limit of {limit} bytes "
                "(max_body_bytes)",
            )
        return length

    def _body(self, length: int) -> bytes:
        """``length`` bytes, all of which must arrive within the read timeout: a client that
        sends a byte now and then cannot hold its thread for longer."""
        chunks, received = [], 0
        deadline = time.monotonic() + self.limits.read_timeout_s
        try:
            while received < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                chunk = self.rfile.read1(length - received)
                if not chunk:
                    raise _Rejected(
                        400,
                        f"the body ended after {received} of the {length} bytes its "
                        "Content-Length announced",
                    )
                chunks.append(chunk)
                received += len(chunk)
        except TimeoutError:
            raise _Rejected(
                408,
                f"the body did not arrive within this server's read timeout of "
                f"{self.limits.read_timeout_s:g} s (read_timeout_s)",
            ) from None
        return b"".join(chunks)

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == http.HTTPStatus.METHOD_NOT_ALLOWED:
                self.send_header("Allow", "POST")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client left; nobody to tell
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own rejections (a bad request line, an unknown method, oversized
        headers) as JSON too."""
        self.close_connection = True
        self._reply(code, {"error": message or http.HTTPStatus(code).phrase})

    def log_message(self, format, *args):
        logging.info("%s " + format, self.address_string(), *args)


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A connection that broke (reset, closed mid-reply): one log line, no traceback."""
        logging.warning("connection from %s failed: %r", client_address[0], sys.exc_info()[1])


def make_server(
    model: ServedModel, port: int = 0, limits: Limits = Limits()
) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 (``port=0``: any free port, see ``server.server_port``).

    ``POST /predict`` with a PNG file as the body answers ``{"top_class", "class_name",
    "probabilities"}``; anything else a JSON ``{"error"}`` (module docstring). Run
    ``serve_forever()``; each connection gets its own daemon thread.
    """
    attributes = {
        "model": model,
        "limits": limits,
        "lock": threading.Lock(),
        "timeout": limits.read_timeout_s,
    }
    return _Server(("127.0.0.1", port), type("Handler", (_Handler,), attributes))
