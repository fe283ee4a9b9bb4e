"""The command line's way to the running node: its local API, with the owner's credential."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx

from plugshare.errors import PlugshareError
from plugshare.node.home import Home


class NodeUnreachable(PlugshareError):
    """No node answers on the home's API address."""


class ApiRefused(PlugshareError):
    """The node answered with an error (4xx/5xx)."""

    def __init__(self, status: int, error: str, reason: str):
        super().__init__(f"{reason} ({error}, HTTP {status})")
        self.status, self.error, self.reason = status, error, reason


def api_url(home: Home) -> str:
    """Where the node of this home serves its API: run.json while it runs, else node.toml."""
    runtime = home.runtime()
    if runtime and runtime.get("api"):
        return runtime["api"]
    return f"http://{home.load_config().api.listen}"


class NodeClient:
    def __init__(self, home: Home, *, timeout: float = 30.0):
        if not home.exists():
            raise NodeUnreachable(
                f"{home.root} is not a plugshare home; create it with `plugshare init` "
                "(or point --home / PLUGSHARE_HOME at one)"
            )
        self.home = home
        self.base_url = api_url(home)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {home.owner_credential()}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise NodeUnreachable(
                f"no node is running for {self.home.root} (nothing answers at {self.base_url}: "
                f"{exc.__class__.__name__}); start it with `plugshare run`"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": "bad_response", "reason": response.text[:200]}
        if response.is_error:
            raise ApiRefused(
                response.status_code, body.get("error", "error"), body.get("reason", "")
            )
        return body

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A request whose bodies stream (a file up or down); `ApiRefused` on an error
        answer (read whole: it is a short JSON)."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.is_error:
                    response.read()
                    try:
                        body = response.json()
                    except ValueError:
                        body = {"error": "bad_response", "reason": response.text[:200]}
                    raise ApiRefused(response.status_code, body.get("error", "error"),
                                     body.get("reason", ""))
                yield response
        except httpx.TransportError as exc:
            raise NodeUnreachable(
                f"the node at {self.base_url} did not finish the transfer "
                f"({exc.__class__.__name__}: {exc})") from None
