"""Where serving writes the exposure log (format: model.exposure_log).

``serve.exposure_log``: ``redis`` (the stream, shared by every replica, flushed to parquet by
``ray_jobs.flush_log``), ``memory`` (a list in this process: local runs and tests; gone with
the process) or ``off``. Writing is best effort with a short deadline: a log that is down
never fails or slows a ranking request; the ingress counts what it could not write
(``unirank_errors{kind="exposure_log"}``).
"""

from __future__ import annotations

from collections import deque

from model.exposure_log import RECORD_FIELD, Exposure, Outcome, decode, encode, stream_key


class MemoryExposureLog:
    """The newest ``max_entries`` records in this process (older ones are dropped, counted
    in ``dropped``): for local runs and tests, not for experiments that must not lose data."""

    backend = "memory"

    def __init__(self, max_entries: int = 100_000):
        self.entries: deque[tuple[str, str]] = deque(maxlen=max_entries)  # (id, JSON)
        self.written = self.dropped = 0

    async def append(self, record: Exposure | Outcome) -> None:
        self.dropped += len(self.entries) == self.entries.maxlen
        self.written += 1
        self.entries.append((f"{self.written}-0", encode(record)))

    async def read(self, use_case: str) -> list[tuple[str, Exposure | Outcome]]:
        return [(sid, r) for sid, text in self.entries if (r := decode(text)).use_case == use_case]

    async def close(self) -> None:
        pass


class RedisExposureLog:
    backend = "redis"

    def __init__(self, url: str):
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    async def append(self, record: Exposure | Outcome) -> None:
        await self.client.xadd(stream_key(record.use_case), {RECORD_FIELD: encode(record)})

    async def close(self) -> None:
        await self.client.aclose()


def make_exposure_log(kind: str, redis_url: str):
    if kind == "off":
        return None
    if kind == "redis":
        return RedisExposureLog(redis_url)
    return MemoryExposureLog()
