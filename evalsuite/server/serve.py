"""Starting the server: a loaded model behind the app, on uvicorn (a background thread for tests
and benchmarks, or the foreground for ``evalsuite serve``)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Any

import uvicorn

from ..engine.load import LoadedModel
from ..engine.options import NUMERICS_VERSION
from .app import ServedModel, create_app
from .scheduler import Scheduler


def served_model(lm: LoadedModel, recipe: dict[str, Any], name: str | None = None, *, max_batch_size: int = 32,
                 max_len: int = 2048, max_prefill_tokens: int = 2048, prefix_cache: bool = True) -> ServedModel:
    if lm.tokenizer is None:
        raise ValueError(f"model {lm.info.name!r} has no tokenizer; the server needs one")
    scheduler = Scheduler(lm.model, max_batch_size=max_batch_size, max_len=max_len,
                          max_prefill_tokens=max_prefill_tokens, prefix_cache=prefix_cache).start()
    from ..bench import device_info, kernel_path

    info = dataclasses.asdict(lm.info)
    device = str(lm.model.device)
    model = {**{k: info[k] for k in ("name", "source", "weights_sha256", "dtype")}, "numerics": NUMERICS_VERSION}
    card = {"evalsuite": {"model": model,
                          "recipe": recipe, "device": device, **device_info(device),
                          "kernel_path": kernel_path(recipe, lm.model), "prefix_cache": prefix_cache}}
    return ServedModel(name or lm.info.name, lm.tokenizer, scheduler, card)


class BackgroundServer:
    """uvicorn in a thread of this process, on 127.0.0.1 and a free port unless given one."""

    def __init__(self, served: ServedModel, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.served = served
        self.host, self.port = host, port or free_port()
        config = uvicorn.Config(create_app(served, api_key), host=self.host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        """Stop the server and its scheduler (safe to call more than once)."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.served.scheduler.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_forever(served: ServedModel, sock: socket.socket, api_key: str | None) -> None:
    """Serve on ``sock`` (bound and listening, see ``listen.listening_socket``) until interrupted."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(served, api_key), host=host, port=port, log_level="info")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        served.scheduler.shutdown()
        sock.close()
