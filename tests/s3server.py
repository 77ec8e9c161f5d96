"""A local S3 server for the object-storage tests: moto's threaded server on 127.0.0.1, a free port."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """``{"options": storage_options, "json": the same as JSON, "fs": an s3fs filesystem}``."""
    server_mod = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # children (CLI, torchrun ranks) inherit them
    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request slows the server
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}"}
    try:
        yield {"options": options, "json": json.dumps(options), "fs": s3fs.S3FileSystem(**options)}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A fresh bucket for one test."""
    name = "t" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50]
    s3_server["fs"].mkdir(name)
    return name


def objects(fs: Any, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` by relative key; the root document normalised as crashkit does."""
    from tests import crashkit

    fs.invalidate_cache()
    out = {}
    for path in sorted(fs.find(prefix)):
        key = path[len(prefix) + 1 :]
        data = fs.cat_file(path)
        if key == "zarr.json":
            doc = json.loads(data)
            meta = doc["attributes"]["blockcap"]
            doc["attributes"]["blockcap"] = {k: v for k, v in meta.items() if k not in crashkit.VOLATILE}
            data = json.dumps(doc, sort_keys=True).encode()
        out[key] = data
    return out
