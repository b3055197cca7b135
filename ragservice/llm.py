"""The LLM behind the service: any OpenAI-compatible server (kaito-serve by default), with an optional key.
Its model name and context window come from `/v1/models` (`max_model_len`) unless configured."""

from __future__ import annotations

import httpx

FALLBACK_CONTEXT_WINDOW = 4096


class LLMError(RuntimeError):
    """The LLM could not be reached or answered nonsense (502)."""


class LLMClient:
    def __init__(self, base_url: str, api_key: str | None = None, context_window: int | None = None) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), headers=self.headers)
        self._window = context_window
        self._model: str | None = None

    async def info(self) -> tuple[str, int]:
        """(default model name, context window in tokens)."""
        if self._model is None:
            try:
                r = await self.client.get(f"{self.base_url}/v1/models")
                r.raise_for_status()
                card = r.json()["data"][0]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise LLMError(f"cannot list the models of the LLM at {self.base_url}: {e}") from e
            self._model = card["id"]
            if self._window is None:
                self._window = int(card.get("max_model_len") or FALLBACK_CONTEXT_WINDOW)
        return self._model, self._window

    async def chat(self, body: dict) -> httpx.Response:
        try:
            return await self.client.post(f"{self.base_url}/v1/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise LLMError(f"the LLM at {self.base_url} failed: {e}") from e

    async def open_stream(self, body: dict) -> httpx.Response:
        """The LLM's response with its body still unread (the caller closes it)."""
        request = self.client.build_request("POST", f"{self.base_url}/v1/chat/completions", json=body)
        try:
            return await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise LLMError(f"the LLM at {self.base_url} failed: {e}") from e

    async def close(self) -> None:
        await self.client.aclose()
