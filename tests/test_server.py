"""The model server no client can block, and the deploy command line's one-line errors.

A randomly initialised ``vit_tiny8`` at 32px (patches of 8) with a random linear head, served
with small limits: bodies up to 4 KiB, at most 2 patch rows below the image (48 pixels high).
Requests are written byte by byte on raw sockets, as a careless or hostile client would.
"""

import json
import socket
import subprocess
import sys
import threading
import time
import types

import helpers
import jax
import numpy as np
import pytest

from jprompt.deploy import __main__ as cli
from jprompt.deploy import client, server
from jprompt.errors import InputError
from jprompt.methods import vp
from jprompt.models import backbones, vit
from jprompt.train import checkpoint, config_lib
from jprompt.train.workdir import CONFIG_FILE

SIZE, PATCH, NUM_CLASSES = 32, 8, 3
LIMITS = server.Limits(max_body_bytes=4096, max_extra_rows=2, read_timeout_s=5.0)
HEIGHT_LIMIT = "this server's limit of 48 pixels high (32 + max_extra_rows = 2 patch rows of 8)"


@pytest.fixture(scope="module")
def model():
    backbone = backbones.Backbone(
        "vit_tiny8", vit.create("vit_tiny8", num_classes=0), SIZE, backbones.VIT_NORMALIZATION
    )
    dummy = np.zeros((1, SIZE, SIZE, 3), np.float32)
    params = jax.jit(backbone.module.init)(jax.random.PRNGKey(0), dummy)["params"]
    kernel = np.random.default_rng(0).normal(size=(backbone.feature_dim, NUM_CLASSES))
    head = {"kernel": kernel.astype(np.float32), "bias": np.zeros(NUM_CLASSES, np.float32)}
    return server.ServedModel.from_trained(
        backbone, {"params": {"head": head}}, {"backbone": params}, ("a", "b", "c")
    )


def running(model, limits):
    httpd = server.make_server(model, 0, limits)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, thread


@pytest.fixture(scope="module")
def port(model):
    httpd, thread = running(model, LIMITS)
    yield httpd.server_port
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def image(height=SIZE, width=SIZE):
    return np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)


def post(body: bytes, length=None) -> bytes:
    """A POST /predict request; ``length`` None: no Content-Length header."""
    header = "" if length is None else f"Content-Length: {length}\r\n"
    return f"POST /predict HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode() + body


def exchange(port: int, request: bytes, hang_up: bool = True) -> tuple[int, dict]:
    """Send ``request`` (then end the stream, unless not ``hang_up``), read the reply to the
    end: ``(status, JSON body)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        if hang_up:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head, head
    return int(head.split()[1]), json.loads(body)


def test_idle_and_slow_clients_do_not_block_a_valid_request(model, port):
    picture = image()
    expected = np.asarray(jax.nn.softmax(model.logits(picture[None])[0]))  # compiled here
    idle = socket.create_connection(("127.0.0.1", port))
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(post(b"\x89PNG", 1000))  # 4 of the 1000 bytes announced
    try:
        start = time.monotonic()
        answer = client.query(f"http://127.0.0.1:{port}/predict", client.encode_png(picture))
        elapsed = time.monotonic() - start
    finally:
        idle.close()
        slow.close()
    assert elapsed < 1.0, elapsed
    assert answer["class_name"] == "abc"[int(expected.argmax())]
    np.testing.assert_allclose(answer["probabilities"], expected, rtol=1e-5)


def test_read_timeout_ends_slow_and_idle_connections(model):
    httpd, thread = running(model, server.Limits(read_timeout_s=0.2))
    try:
        start = time.monotonic()
        status, payload = exchange(httpd.server_port, post(b"\x89PNG", 1000), hang_up=False)
        assert status == 408 and time.monotonic() - start < 2
        assert payload == {
            "error": "the body did not arrive within this server's read timeout of 0.2 s "
            "(read_timeout_s)"
        }
        with socket.create_connection(("127.0.0.1", httpd.server_port), timeout=2) as idle:
            assert idle.recv(1) == b""  # closed by the server, without a word
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_malformed_headers_get_json_errors(port):
    for length, status, error in [
        (None, 411, "a Content-Length header is required (at most 4096 bytes)"),
        ("-1", 400, "Content-Length '-1' is not a byte count (a whole number)"),
        ("abc", 400, "Content-Length 'abc' is not a byte count (a whole number)"),
        (
            "1000000000000",
            413,
            "the body of 1000000000000 bytes is over this server's limit of 4096 bytes "
            "(max_body_bytes)",
        ),
    ]:
        assert exchange(port, post(b"", length)) == (status, {"error": error}), length


def test_bodies_and_images_beyond_the_limits(port):
    def send(body: bytes):
        return exchange(port, post(body, len(body)))

    big = client.encode_png(image(SIZE + 2 * PATCH))
    assert len(big) > LIMITS.max_body_bytes
    assert exchange(port, post(b"", len(big))) == (  # refused before a byte of it is read
        413,
        {
            "error": f"the body of {len(big)} bytes is over this server's limit of 4096 bytes "
            "(max_body_bytes)"
        },
    )
    tall = client.encode_png(np.zeros((SIZE + 3 * PATCH, SIZE, 3), np.uint8))
    assert send(tall) == (400, {"error": f"the image is 56 pixels high, over {HEIGHT_LIMIT}"})
    wide = client.encode_png(np.zeros((SIZE, SIZE + 1, 3), np.uint8))
    assert send(wide) == (
        400,
        {
            "error": "expected an image 32 pixels wide and 32 + a multiple of 8 pixels high, got "
            "33 wide and 32 high"
        },
    )
    not_png = {"error": "the body is not an image: POST the bytes of a PNG file"}
    assert send(b"GIF? no") == (400, not_png)
    png = client.encode_png(image())
    assert send(png[: len(png) // 2]) == (400, {"error": "the image data is truncated or corrupt"})
    assert exchange(port, post(png, len(png) + 10)) == (  # the client hangs up early
        400,
        {
            "error": f"the body ended after {len(png)} of the {len(png) + 10} bytes its "
            "Content-Length announced"
        },
    )


def test_other_methods_and_paths(port):
    for method in ("GET", "PUT", "DELETE"):
        status, payload = exchange(port, f"{method} /predict HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (status, payload) == (
            405,
            {"error": f"{method} is not supported: POST a PNG to /predict"},
        )
    assert exchange(port, b"POST /other HTTP/1.1\r\nContent-Length: 0\r\n\r\n") == (
        404,
        {"error": "no endpoint /other: POST a PNG to /predict"},
    )
    assert exchange(port, b"BREW /predict HTTP/1.1\r\n\r\n") == (
        501,
        {"error": "Unsupported method ('BREW')"},
    )


# --- The command line ----------------------------------------------------------------------------


def test_export_refuses_a_wrong_workdir_and_writes_nothing(tmp_path):
    config = helpers.load_config("pgn.py", "demo,deployable")
    out = tmp_path / "out" / "client.npz"
    with pytest.raises(InputError, match=f"cannot write {out}: its folder does not exist"):
        cli.export(config, tmp_path, out)
    missing, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "client.npz"
    for workdir, message in [
        (
            missing,
            f"workdir {missing} does not exist: pass the --workdir of a run trained with python "
            "-m jprompt.main",
        ),
        (
            empty,
            f"{empty} holds no trained checkpoint: train it first with python -m jprompt.main "
            f"--config=... --workdir={empty}",
        ),
    ]:
        with pytest.raises(InputError) as raised:
            cli.export(config, workdir, out)
        assert str(raised.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing made, nothing written
    assert not any(empty.iterdir())


def test_export_refuses_a_run_trained_with_another_config(tmp_path):
    trained_with = helpers.load_config("pgn.py", "demo,deployable")
    (tmp_path / checkpoint.BEST_DIR).mkdir()
    (tmp_path / CONFIG_FILE).write_text(config_lib.to_json(trained_with))
    config = helpers.load_config("pgn.py", "demo,deployable,num_tokens=4")
    out = tmp_path / "client.npz"
    with pytest.raises(InputError) as raised:
        cli.export(config, tmp_path, out)
    assert str(raised.value) == (
        f"{tmp_path} was trained with another config ({tmp_path / 'config.json'}): "
        f"method.num_tokens: {trained_with.method.num_tokens} -> 4. Pass the --config it was "
        "trained with"
    )
    assert not out.exists()


def test_export_command_prints_one_line_for_a_bad_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jprompt.deploy", "--mode=export", f"--workdir={tmp_path}"]
        + ["--config=configs/pgn.py:demo,num_tokenz=4", f"--client_file={tmp_path / 'c.npz'}"],
        capture_output=True,
        text=True,
        cwd=helpers.ROOT,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "unknown config arg 'num_tokenz'; valid args: ['backbone', 'baseline', 'dataset', 'demo', "
        "'deployable', 'fewshot_seed', 'head', 'library_size', 'num_tokens', 'shots']"
    )
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_export_refuses_a_run_that_is_not_a_deployable_pgn(tmp_path, monkeypatch):
    from jprompt.deploy import run

    config = helpers.load_config("vp.py", "demo")
    backbone = backbones.Backbone("vit_tiny8", vit.create("vit_tiny8"), SIZE, "minus_one_to_one")
    experiment = types.SimpleNamespace(
        config=config, method=vp.VisualPrompt(backbone=backbone, num_classes=2), frozen={}
    )
    monkeypatch.setattr(run, "restore", lambda config, workdir: (experiment, {}))
    out = tmp_path / "client.npz"
    with pytest.raises(InputError, match="^cannot deploy a VisualPrompt run: only a PGN"):
        cli.export(config, tmp_path, out)
    assert not out.exists()


def test_client_command_prints_one_line_for_a_bad_client_file(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 10)
    result = subprocess.run(
        [sys.executable, "-m", "jprompt.deploy", "--mode=client", f"--client_file={garbage}"]
        + [f"--image={tmp_path / 'photo.png'}"],
        capture_output=True,
        text=True,
        cwd=helpers.ROOT,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"{garbage} is not an .npz archive numpy can read; expected a PGN client file (an .npz "
        "written by python -m jprompt.deploy --mode=export)"
    )
    assert "Traceback" not in result.stderr
