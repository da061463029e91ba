"""Not a test module: .ci/run type-checks it with `mypy --strict` against a plain (non-editable) install,
so that the client's types reach the code that uses it (the package ships py.typed). Each function
returns what it reads, so an attribute typed Any (no py.typed) fails --strict's warn-return-any too."""

from __future__ import annotations

from datetime import datetime

from zypher_ws.client import (
    ApiError,
    AsyncClient,
    Chunk,
    Client,
    Prediction,
    Progress,
    RetryPolicy,
    Status,
    WebhookState,
)


def status_of(client: Client, prediction_id: str) -> Status:
    return client.get(prediction_id).status


def every_state(client: Client, ids: list[str]) -> list[Prediction]:
    return list(client.watch(ids))


async def finished(client: AsyncClient, prediction_id: str) -> Prediction:
    return await client.wait(prediction_id, timeout=1.0)


async def submitted_id(client: AsyncClient) -> str:
    return (await client.submit([0] * 64, idempotency_key="k")).prediction_id


def code_of(error: ApiError) -> str:
    return error.code


def patient() -> Client:
    return Client("http://127.0.0.1:8080", token=None, timeout=5.0, retry=RetryPolicy(total=60))


def chunks_of(client: Client, prediction_id: str) -> list[Chunk]:
    return [item for item in client.stream(prediction_id) if isinstance(item, Chunk)]


async def last_progress(client: AsyncClient, prediction_id: str) -> Progress | None:
    last: Progress | None = None
    async for item in client.stream(prediction_id, from_index=2):
        if isinstance(item, Progress):
            last = item
    return last


async def streamed(client: AsyncClient) -> int | None:
    return (await client.submit({"prompt": "hi"}, stream=True)).queue_position


def with_webhook(client: Client) -> WebhookState | None:
    return client.predict([0] * 64, webhook="https://example.com/hook", webhook_events_filter=["start"]).webhook


async def delivered_at(client: AsyncClient) -> datetime | None:
    webhook = (await client.submit([0] * 64, webhook="https://example.com/hook")).webhook
    return webhook.delivered_at if webhook is not None and webhook.delivered else None
