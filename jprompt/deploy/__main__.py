r"""Deploy a trained PGN as plain RGB: export its client, serve the frozen model, query it.

``--config`` and ``--workdir`` name a trained run, as for ``jprompt.main``::

    python -m jprompt.deploy --mode=export --config=CONFIG --workdir=W --client_file=pgn.npz
    python -m jprompt.deploy --mode=serve --config=CONFIG --workdir=W --port=8000
    python -m jprompt.deploy --mode=client --client_file=pgn.npz --image=photo.png \
        [--url=http://127.0.0.1:8000/predict] [--prompted_out=prompted.png]

Bad input (a missing flag, a workdir without a trained run, a run that is not a deployable PGN,
a file that is not a client, an unreachable server) ends in one line naming it and the fix,
with nothing written.
"""

import json
import urllib.error

from absl import app, flags, logging
from etils import epath

from jprompt.deploy import client, server
from jprompt.errors import InputError
from jprompt.train import config_lib

REQUIRED = {
    "export": ("config", "workdir", "client_file"),
    "serve": ("config", "workdir"),
    "client": ("client_file", "image"),
}


def export(config, workdir, client_file) -> None:
    """Write the client of the deployable PGN trained in ``workdir``."""
    # Imported here: the client mode needs neither the trainer nor TensorFlow.
    from jprompt.deploy import run

    _check_folder(client_file)
    experiment, trained = run.restore(config, workdir)
    run.export_client(experiment, trained).save(client_file)
    print(f"Wrote {client_file}")


def serve(config, workdir, port: int, limits: server.Limits) -> None:
    """Serve the backbone and head trained in ``workdir`` until interrupted."""
    from jprompt.deploy import run

    experiment, trained = run.restore(config, workdir)
    model = run.served_model(experiment, trained)
    try:
        httpd = server.make_server(model, port, limits)
    except OSError as error:
        raise InputError(
            f"cannot listen on 127.0.0.1:{port} ({error.strerror}); pick another --port"
        ) from None
    server.warm_up(model, limits)
    logging.set_verbosity(logging.INFO)  # from now on, one line per request
    print(
        f"Serving on http://127.0.0.1:{httpd.server_port}{server.PREDICT_PATH} (heights "
        f"{model.heights(limits.max_extra_rows)}, bodies up to {limits.max_body_bytes} bytes)",
        flush=True,
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C: the usual way to stop it
        print("Stopped")
    finally:
        httpd.server_close()


def classify(client_file, image_file, url: str, prompted_out=None) -> str:
    """The server's answer for ``image_file``, prompted by the client in ``client_file``."""
    if prompted_out:
        _check_folder(prompted_out)
    pgn_client = client.ClientModel.load(client_file)
    image = pgn_client.prepare(client.read_image(image_file))
    png = client.encode_png(client.deploy(pgn_client, image[None]).images[0])
    try:
        answer = client.query(url, png)
    except urllib.error.HTTPError as error:
        raise InputError(f"{url} answered {error.code}: {_error_text(error)}") from None
    except OSError as error:  # urllib.error.URLError, a refused or timed-out connection
        reason = getattr(error, "reason", error)
        raise InputError(
            f"cannot reach {url} ({reason}); start the server with python -m jprompt.deploy "
            "--mode=serve"
        ) from None
    if prompted_out:
        epath.Path(prompted_out).write_bytes(png)
    top = answer["top_class"]
    return f"{answer['class_name']} (class {top}, p = {answer['probabilities'][top]:.3f})"


def load_config(spec: str):
    """The config ``--config=spec`` names (a file and its args, as for ``jprompt.main``)."""
    try:
        config = config_lib.load(spec)
        config_lib.validate(config)
    except ValueError as error:  # the file, its args or a field rejected the input
        raise InputError(str(error)) from None
    return config


def _check_folder(path) -> None:
    """Before any work: the folder an output file goes to exists (none is created)."""
    if not epath.Path(path).parent.is_dir():
        raise InputError(f"cannot write {path}: its folder does not exist")


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read())["error"]
    except (ValueError, KeyError, TypeError):
        return error.reason


def main(argv):
    args = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # restoring a run logs hundreds of library lines
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    missing = [f"--{name}" for name in REQUIRED[args.mode] if args[name].value in (None, "")]
    if missing:
        raise SystemExit(f"--mode={args.mode} needs {', '.join(missing)}")
    try:
        if args.mode == "export":
            export(load_config(args.config), args.workdir, args.client_file)
        elif args.mode == "serve":
            limits = server.Limits(args.max_body_bytes, args.max_extra_rows, args.read_timeout_s)
            serve(load_config(args.config), args.workdir, args.port, limits)
        else:
            print(classify(args.client_file, args.image, args.url, args.prompted_out))
    except InputError as error:  # bad input, named with its fix
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    # Defined only when run, so that importing this module (the tests do) defines no flags.
    flags.DEFINE_enum("mode", None, list(REQUIRED), "What to run.")
    flags.DEFINE_string(
        "config", None, "Config file and args of the trained run, e.g. configs/pgn.py:demo."
    )
    flags.DEFINE_string("workdir", None, "Work directory of the trained run.")
    flags.DEFINE_string("client_file", None, "The exported client .npz.")
    flags.DEFINE_integer("port", 8000, "serve: port on 127.0.0.1.")
    defaults = server.Limits()
    flags.DEFINE_integer("max_body_bytes", defaults.max_body_bytes, "serve: largest body.")
    flags.DEFINE_integer(
        "max_extra_rows", defaults.max_extra_rows, "serve: most patch rows below the image."
    )
    flags.DEFINE_float(
        "read_timeout_s", defaults.read_timeout_s, "serve: seconds per read and for a body."
    )
    flags.DEFINE_string("image", None, "client: the image file to classify.")
    flags.DEFINE_string("url", f"http://127.0.0.1:8000{server.PREDICT_PATH}", "client: endpoint.")
    flags.DEFINE_string("prompted_out", None, "client: also save the prompted PNG.")
    flags.mark_flag_as_required("mode")
    app.run(main)
