"""The Hugging Face hub side of loading: where a model name points, and whether the hub answers.

An unreachable hub fails at once (a TCP probe, ``HUB_PROBE_SECONDS``) instead of after the hub
client's retries; offline, a hub id loads from the local cache alone.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from blockcap.core.errors import BlockcapError

HUB_PROBE_SECONDS = 3.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUE = {"1", "ON", "YES", "TRUE"}


def missing_extra(model: str) -> BlockcapError:
    return BlockcapError(
        f"model={model!r} needs transformers, which is not installed; install blockcap[hf] "
        f"(pip install 'blockcap[hf]')"
    )


def unreachable(model: str) -> BlockcapError:
    return BlockcapError(
        f"model={model!r} is not a local directory, the Hugging Face hub could not be reached (or "
        f"HF_HUB_OFFLINE is set) and the local hub cache lacks it; download it elsewhere (from_pretrained, "
        f"then save_pretrained(DIR)) and pass model=DIRECTORY"
    )


def locate(model: str, revision: str | None) -> tuple[Path | str, bool]:
    """``model`` as an existing directory (checked) or a hub id; True when it is a directory."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BlockcapError(
                f"model={model!r} is a file; pass a directory written by save_pretrained or a hub id"
            )
        if not (path / "config.json").is_file():
            raise BlockcapError(
                f"model directory {path} has no config.json; pass a directory written by save_pretrained"
            )
        if revision is not None:
            raise BlockcapError(f"revision={revision!r} is for a hub id, not the directory {path}")
        return path.resolve(), True
    if not _HUB_ID.fullmatch(model) or ".." in model:
        raise BlockcapError(
            f"model directory {path} does not exist; pass a directory written by save_pretrained "
            f"or a hub id such as EleutherAI/pythia-70m"
        )
    return model, False


def _offline_by_env() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable() -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``HUB_PROBE_SECONDS``.

    Behind a proxy a direct connection proves nothing, so the hub client decides there. The probe
    runs in a thread because name resolution has no timeout of its own.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
            opened.append(True)
        except (OSError, UnicodeError):
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_SECONDS)
    return bool(opened)


def hub_options(name: str, revision: str | None) -> dict[str, Any]:
    """``from_pretrained`` options for a hub id: from the cache alone when the hub is out of reach.

    Offline, a model missing from the cache fails here at once, before transformers is imported,
    instead of after the hub client's retries.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise missing_extra(name) from None
    offline = _offline_by_env() or not _hub_reachable()
    if offline and not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        raise unreachable(name)
    return {"revision": revision, "local_files_only": offline}


def snapshot(name: str, revision: str | None) -> Path:
    """The cache directory (named by its commit) the hub client resolved ``revision`` to."""
    from huggingface_hub import try_to_load_from_cache

    return Path(str(try_to_load_from_cache(name, "config.json", revision=revision))).parent
