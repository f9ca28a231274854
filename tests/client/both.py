"""Both clients behind one interface, so every client test checks the sync and the asyncio client alike."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any, Self

from kvfabric.client import AsyncClient, Client
from kvfabric.client.session import SessionInfo


class BlockingAsyncClient:
    """An :class:`AsyncClient` called like a :class:`Client`: each call runs to completion on an event loop in a
    thread of its own (the client's callbacks, ``on_chunk`` included, run on that loop)."""

    def __init__(self, url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-client", daemon=True)
        self._thread.start()
        weakref.finalize(self, _stop, self._loop, self._thread)  # a closed client's calls still reach the loop
        self.client = AsyncClient(url, **options)

    def _wait(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._wait(attr(*args, **kwargs))

        return call

    @property
    def session(self) -> SessionInfo:
        return self._wait(self.client.session())  # type: ignore[no-any-return]

    @property
    def transport(self) -> str:
        return self._wait(self.client.transport())  # type: ignore[no-any-return]

    def close(self) -> None:
        self._wait(self.client.close())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


Connect = Callable[..., Client]
"""``connect(url, **options)``: a client (sync, or the async one behind :class:`BlockingAsyncClient`)."""

CLIENTS: dict[str, Connect] = {"sync": Client, "async": BlockingAsyncClient}  # type: ignore[dict-item]
