"""EngineHttp: the one HTTP client the engine sources share (aiohttp), turning every failure into SourceError.

aiohttp rather than httpx: the agent is asyncio end to end, aiohttp's per-request `ClientTimeout`
bounds connect + read together, and the tests already serve real engines with `aiohttp.web`, so one
library covers both sides.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

from scheduler_agent.sources.base import SourceError

log = logging.getLogger(__name__)

# Before the aggregator says its round deadline (Welcome), and as a ceiling afterwards.
DEFAULT_TIMEOUT_S = 2.0
# Share of the aggregator's round deadline an engine request may take: the rest is for the report.
ROUND_SHARE = 0.6
MIN_TIMEOUT_S = 0.02


# A /v1/loads body or a /metrics page is KiB, MiB for a big DP node; past this it is not an engine's answer
# (and reading it whole would cost the agent hundreds of MiB beside the scheduler).
MAX_BODY_BYTES = 32 << 20


async def _capped_body(response: aiohttp.ClientResponse, path: str) -> bytes:
    if response.content_length is not None and response.content_length > MAX_BODY_BYTES:
        raise SourceError(f"GET {path}: a {response.content_length}-byte body, past the "
                          f"{MAX_BODY_BYTES >> 20} MiB an engine's answer fits in")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise SourceError(f"GET {path}: the body passed {MAX_BODY_BYTES >> 20} MiB, more than an engine's answer")
        chunks.append(chunk)
    return b"".join(chunks)


class NotFound(SourceError):
    """HTTP 404: the engine does not serve this path (an older version)."""


class EngineHttp:
    """GETs against one engine base URL with a per-request timeout shorter than the aggregator's rounds.

    `api_key`: the engine's own key (sglang and vLLM `--api-key`), sent as `Authorization: Bearer`.
    """

    def __init__(self, base_url: str, timeout_s: float | None = None, api_key: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.fixed_timeout = timeout_s  # set by --engine-timeout-ms: wins over the round share
        self.timeout_s = timeout_s or DEFAULT_TIMEOUT_S
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    def set_round_timeout(self, round_timeout_ms: int) -> None:
        if self.fixed_timeout is None and round_timeout_ms > 0:
            self.timeout_s = max(MIN_TIMEOUT_S, min(DEFAULT_TIMEOUT_S, round_timeout_ms / 1000 * ROUND_SHARE))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Keep-alive to the one engine; aiohttp drops connections the engine closed (restart).
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8, force_close=False),
                                                  headers=self.headers)
        return self._session

    async def get_text(self, path: str) -> str:
        url = f"{self.base_url}{path}"
        try:
            async with self._client().get(url, timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as response:
                if response.status == 404:
                    raise NotFound(f"GET {path}: HTTP 404")
                if response.status in (401, 403):
                    raise SourceError(f"GET {path}: HTTP {response.status}: " + (
                        "the engine refused this agent's API key; give the agent the engine's --api-key"
                        if self.headers else "the engine wants an API key (it was started with --api-key); "
                        "give the agent the same key with --engine-api-key or LOADAGG_ENGINE_API_KEY"))
                if response.status != 200:
                    raise SourceError(f"GET {path}: HTTP {response.status}")
                return (await _capped_body(response, path)).decode(response.get_encoding())
        except TimeoutError:
            raise SourceError(f"GET {path}: no answer within the engine timeout") from None
        except aiohttp.ClientConnectionError as error:
            raise SourceError(f"GET {path}: engine unreachable ({type(error).__name__})") from None
        except aiohttp.ClientError as error:
            raise SourceError(f"GET {path}: {type(error).__name__}") from None
        except UnicodeDecodeError:
            raise SourceError(f"GET {path}: body is not text") from None

    async def get_json(self, path: str) -> Any:
        text = await self.get_text(path)
        try:
            return json.loads(text)
        except ValueError:
            raise SourceError(f"GET {path}: body is not JSON") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
