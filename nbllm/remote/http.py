"""HTTP to an OpenAI-compatible server: JSON requests, server-sent-event streams, and clear errors.

Built on ``httpx``. Every failure reaches the caller as one line: a request the
server refused (4xx) as ``ValueError`` with the server's own message; a
server that is down, too slow, fails (5xx), drops the connection or sends
something that is not the API's JSON as ``ConnectionError``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx

__all__ = ["Client", "EventStream"]


class Client:
    """One server: its base URL (``.../v1``), the bearer token, and the timeout.

    Args:
        base_url: The server's API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added when missing).
        api_key: Sent as ``Authorization: Bearer ...`` when given.
        timeout: Seconds to wait to connect and between bytes of a reply.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http:// or https:// URL, got {base_url!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.timeout = float(timeout)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.timeout))

    def get(self, path: str) -> Any:
        """``GET base_url + path`` as JSON."""
        return self._json(lambda: self._http.get(path), path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """``POST`` a JSON body; the JSON reply."""
        return self._json(lambda: self._http.post(path, json=body), path)

    def stream(self, path: str, body: dict[str, Any]) -> EventStream:
        """``POST`` with ``stream: true``; the server-sent events as JSON dicts (see ``EventStream``)."""
        return EventStream(self, path, dict(body, stream=True))

    def close(self) -> None:
        self._http.close()

    def _json(self, send: Any, path: str) -> Any:
        try:
            response = send()
        except httpx.HTTPError as err:
            raise self.connection_error(err, path) from None
        check_status(response, self.base_url + path)
        try:
            return response.json()
        except ValueError:
            raise ConnectionError(f"{self.base_url}{path}: the server sent a reply that is not JSON") from None

    def connection_error(self, err: Exception, path: str) -> ConnectionError:
        where = self.base_url + path
        if isinstance(err, httpx.TimeoutException):
            return ConnectionError(f"{where}: no reply within the {self.timeout:g} s timeout")
        if isinstance(err, httpx.ConnectError):
            return ConnectionError(f"{where}: cannot connect (is the server running?)")
        if isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError)):
            return ConnectionError(f"{where}: the server dropped the connection")
        return ConnectionError(f"{where}: {type(err).__name__}: {err}")


def check_status(response: httpx.Response, where: str) -> None:
    """Raise the one-line error a non-2xx reply means (after reading its body)."""
    if response.status_code < 400:
        return
    response.read()
    message = _error_message(response)
    if response.status_code in (401, 403):
        raise PermissionError(f"{where}: {response.status_code} {message} (check api_key)")
    if response.status_code < 500 and response.status_code != 429:
        raise ValueError(f"{where}: the server refused the request ({response.status_code}): {message}")
    raise ConnectionError(f"{where}: server error {response.status_code}: {message}")


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-style ``{"error": {"message": ...}}`` body (or ``{"error": "..."}``, or text)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error
    return str(error)[:300]


class EventStream:
    """A streamed reply: iterate it for each event's JSON; ``close()`` ends it from any thread.

    Ends at ``data: [DONE]`` (or when the server closes the stream). The HTTP
    request is sent when iteration starts.
    """

    def __init__(self, client: Client, path: str, body: dict[str, Any]):
        self._client, self._path, self._body = client, path, body
        self._response: httpx.Response | None = None
        self._closed = False
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        client, where = self._client, self._client.base_url + self._path
        try:
            request = client._http.build_request("POST", self._path, json=self._body)
            response = client._http.send(request, stream=True)
        except httpx.HTTPError as err:
            raise client.connection_error(err, self._path) from None
        with self._lock:
            self._response = response
            closed = self._closed
        try:
            if closed:
                return
            check_status(response, where)
            yield from self._events(response, where)
        except Exception as err:
            if self._closed:  # closed from another thread: whatever the read raised, the stream just ends
                return
            if isinstance(err, (httpx.HTTPError, httpx.StreamError)):
                raise client.connection_error(err, self._path) from None
            raise
        finally:
            response.close()

    def _events(self, response: httpx.Response, where: str) -> Iterator[dict[str, Any]]:
        for line in response.iter_lines():
            if self._closed:
                return
            if not line.startswith("data:"):
                continue  # comments, event names, keep-alives
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise ConnectionError(f"{where}: the server sent a malformed event: {data[:80]!r}") from None
            if not isinstance(event, dict):
                raise ConnectionError(f"{where}: the server sent a malformed event: {data[:80]!r}")
            if "error" in event and "choices" not in event:
                raise ConnectionError(f"{where}: the server failed mid-stream: {_event_error(event)}")
            yield event

    def close(self) -> None:
        """Close the connection now (the server sees the client go); safe from any thread."""
        with self._lock:
            self._closed = True
            response = self._response
        if response is not None:
            response.close()


def _event_error(event: dict[str, Any]) -> str:
    error = event["error"]
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
