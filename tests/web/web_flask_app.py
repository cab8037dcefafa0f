"""A Flask app (WSGI) the web tests serve with ``sockshare serve`` and with gunicorn.

Routes: ``/json/<name>`` (JSON and a cookie), ``/form`` (POST, a form with a field and
an uploaded file: the field and the file's name, length and sha256), ``/error`` (raises:
500), ``/teapot`` (an HTTPException: 418), ``/scope`` (the WSGI client address).
"""

from __future__ import annotations

import hashlib

from flask import Flask, Response, abort, jsonify, request

app = Flask(__name__)


@app.get("/json/<name>")
def json_view(name: str) -> Response:
    resp = jsonify({"hello": name, "args": request.args.to_dict()})
    resp.set_cookie("flavour", "oatmeal", samesite="Lax")
    return resp


@app.post("/form")
def form_view() -> Response:
    f = request.files["file"]
    data = f.read()
    return jsonify({"field": request.form.get("field"), "filename": f.filename,
                    "length": len(data), "sha256": hashlib.sha256(data).hexdigest()})


@app.get("/error")
def error_view() -> Response:
    raise ValueError("flask test app error route")


@app.get("/teapot")
def teapot_view() -> Response:
    abort(418)


@app.get("/scope")
def scope_view() -> Response:
    return jsonify({"client": [request.environ.get("REMOTE_ADDR"),
                               int(request.environ.get("REMOTE_PORT") or 0)]})


@app.get("/slow")
def slow_view() -> Response:
    """Busy for 2 s in its thread: the worker's event loop goes on meanwhile."""
    import os
    import time

    time.sleep(2.0)
    return jsonify({"pid": os.getpid()})
