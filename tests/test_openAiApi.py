"""The OpenAI-compatible API through the real `openai` SDK, the service in-process, Ollama played by the stub."""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from PIL import Image

from app import createApp
from tests.conftest import OPENAI_KEY
from tests.ollamaStub import MIDSTREAM_ERROR, REPLY_TEMPLATE, TOOL_REPLY_PREFIX, StubServer

TEXT, VISION, REASONING, EMBED = ("poweron-text-general", "poweron-vision-general", "poweron-text-reasoning",
                                  "poweron-embed")
HELLO = [{"role": "user", "content": "Hallo Welt"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "getWeather", "description": "Weather for a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}


def upstreamChats(stubControl: httpx.Client) -> list[dict]:
    return stubControl.get("/_stub/requests", params={"path": "/api/chat"}).json()["requests"]


async def openService(settings) -> AsyncIterator[tuple]:
    app = createApp(settings)
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service")
        async with AsyncOpenAI(base_url="http://service/v1", api_key=OPENAI_KEY, http_client=http,
                               max_retries=0) as client:
            yield app, client


@pytest.fixture
async def client(stub: StubServer, stubControl: httpx.Client, makeSettings) -> AsyncIterator[AsyncOpenAI]:
    async for _, sdk in openService(makeSettings(ollama={"base_url": stub.baseUrl})):
        yield sdk


def pngDataUrl(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (0, 90, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ------------------------------------------------------------------------------ models


async def test_models_list_shows_only_pulled_external_names(client: AsyncOpenAI, stubControl: httpx.Client,
                                                            makeSettings, stub: StubServer) -> None:
    names = {model.id async for model in client.models.list()}
    assert {TEXT, VISION, REASONING, EMBED} <= names and "poweron-transcribe" not in names
    assert not any(":" in name for name in names)
    stubControl.post("/_stub/remove", json={"name": "qwen2.5:7b"}).raise_for_status()
    async for _, fresh in openService(makeSettings(ollama={"base_url": stub.baseUrl})):
        assert TEXT not in {model.id async for model in fresh.models.list()}
        with pytest.raises(openai.NotFoundError):
            await fresh.models.retrieve(TEXT)
    assert (await client.models.retrieve(VISION)).id == VISION


# ------------------------------------------------------------------------------ chat


async def test_chat_completion_with_f13_parameters(client: AsyncOpenAI, stubControl: httpx.Client) -> None:
    completion = await client.chat.completions.create(model=TEXT, messages=HELLO, temperature=0.1, max_tokens=400)
    assert completion.model == TEXT and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == REPLY_TEMPLATE.format(prompt="Hallo Welt")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 2 and completion.usage.completion_tokens > 0
    sent = upstreamChats(stubControl)[-1]["body"]
    assert sent["model"] == "qwen2.5:7b" and sent["stream"] is False and sent["keep_alive"] == "30m"
    assert sent["options"] == {"num_ctx": 8192, "temperature": 0.1, "num_predict": 400}
    assert "think" not in sent and "tools" not in sent and "format" not in sent


async def test_every_completion_has_a_unique_id(client: AsyncOpenAI) -> None:
    ids = {(await client.chat.completions.create(model=TEXT, messages=HELLO)).id for _ in range(3)}
    assert len(ids) == 3


async def test_streaming_chat_sends_role_deltas_finish_and_usage(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=TEXT, messages=HELLO, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == REPLY_TEMPLATE.format(prompt="Hallo Welt")
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) > 1
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 2
    assert len({chunk.id for chunk in chunks}) == 1


async def test_max_completion_tokens_limits_and_reports_length(client: AsyncOpenAI, stubControl) -> None:
    completion = await client.chat.completions.create(model=TEXT, messages=HELLO, max_completion_tokens=2)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 2
    assert upstreamChats(stubControl)[-1]["body"]["options"]["num_predict"] == 2


async def test_image_part_reaches_ollama_as_raw_base64(client: AsyncOpenAI, stubControl: httpx.Client) -> None:
    content = [{"type": "text", "text": "Was zeigt das Bild?"},
               {"type": "image_url", "image_url": {"url": pngDataUrl(320, 200), "detail": "high"}}]
    completion = await client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": content}])
    assert completion.choices[0].message.content.startswith("This is a deterministic reply")
    images = upstreamChats(stubControl)[-1]["images"]
    assert [(image["width"], image["height"], image["format"]) for image in images] == [(320, 200, "PNG")]
    assert "error" not in images[0]


async def test_image_for_a_text_model_is_a_clear_400(client: AsyncOpenAI) -> None:
    content = [{"type": "image_url", "image_url": {"url": pngDataUrl(8, 8)}}]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": content}])
    assert "`poweron-text-general` cannot read images" in info.value.message
    assert info.value.body["param"] == "messages[0].content[0]"


async def test_remote_image_url_is_refused(client: AsyncOpenAI, stubControl: httpx.Client) -> None:
    content = [{"type": "image_url", "image_url": {"url": "https://images.invalid/cat.png"}}]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": content}])
    assert "must be a data URL" in info.value.message and upstreamChats(stubControl) == []


async def test_image_over_the_pixel_limit_is_413(stub: StubServer, stubControl, makeSettings) -> None:
    settings = makeSettings(ollama={"base_url": stub.baseUrl}, limits={"max_image_pixels": 10_000})
    content = [{"type": "image_url", "image_url": {"url": pngDataUrl(101, 100)}}]
    async for _, sdk in openService(settings):
        with pytest.raises(openai.APIStatusError) as info:
            await sdk.chat.completions.create(model=VISION, messages=[{"role": "user", "content": content}])
    assert info.value.status_code == 413 and "101x100 = 10,100 pixels" in info.value.message


async def test_tool_call_round_trip(client: AsyncOpenAI, stubControl: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Wie ist das Wetter in Bonn?"}]
    first = await client.chat.completions.create(model=TEXT, messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "getWeather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sonnig, 21 Grad"}]
    second = await client.chat.completions.create(model=TEXT, messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == TOOL_REPLY_PREFIX + "Sonnig, 21 Grad"
    assert second.choices[0].finish_reason == "stop"
    upstream = upstreamChats(stubControl)[-1]["body"]["messages"]
    assert upstream[1]["tool_calls"][0]["function"]["arguments"] == json.loads(call.function.arguments)
    assert upstream[2] == {"role": "tool", "content": "Sonnig, 21 Grad", "tool_name": "getWeather",
                           "tool_call_id": call.id}


async def test_streamed_tool_call_arrives_as_one_delta(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=TEXT, messages=HELLO, tools=[WEATHER_TOOL], stream=True)
    chunks = [chunk async for chunk in stream]
    calls = [call for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "getWeather"
    assert json.loads(calls[0].function.arguments) and calls[0].id.startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_choice_none_sends_no_tools(client: AsyncOpenAI, stubControl: httpx.Client) -> None:
    completion = await client.chat.completions.create(model=TEXT, messages=HELLO, tools=[WEATHER_TOOL],
                                                      tool_choice="none")
    assert completion.choices[0].message.tool_calls is None and completion.choices[0].finish_reason == "stop"
    assert "tools" not in upstreamChats(stubControl)[-1]["body"]


async def test_tools_for_a_model_without_tool_support_are_400(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=VISION, messages=HELLO, tools=[WEATHER_TOOL])
    assert "does not support tools" in info.value.message


async def test_response_format_json_schema(client: AsyncOpenAI, stubControl: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"betrag": {"type": "number"}, "waehrung": {"type": "string"}},
              "required": ["betrag", "waehrung"]}
    completion = await client.chat.completions.create(
        model=TEXT, messages=HELLO,
        response_format={"type": "json_schema", "json_schema": {"name": "rechnung", "schema": schema}})
    answer = json.loads(completion.choices[0].message.content)
    assert set(answer) == {"betrag", "waehrung"} and isinstance(answer["betrag"], (int, float))
    assert upstreamChats(stubControl)[-1]["body"]["format"] == schema


async def test_response_format_with_a_remote_ref_is_400_and_never_reaches_ollama(client: AsyncOpenAI,
                                                                                  stubControl) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=TEXT, messages=HELLO, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "https://schemas.invalid/s.json"}}})
    assert info.value.body["param"] == "response_format" and "only local references" in info.value.message
    assert upstreamChats(stubControl) == []


async def test_unknown_fields_are_ignored_and_logged_by_name_only(client: AsyncOpenAI, stubControl,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="poweron.openai")
    completion = await client.chat.completions.create(
        model=TEXT, messages=HELLO, user="secret-user-0815",
        extra_body={"logit_bias_x": {"secret-token-4711": 5}, "vendor_flag": "secret-value-42"})
    assert completion.choices[0].message.content
    sent = upstreamChats(stubControl)[-1]["body"]
    assert not {"user", "logit_bias_x", "vendor_flag"} & set(sent)
    logged = [record.getMessage() for record in caplog.records if record.name == "poweron.openai"]
    ignored = [message for message in logged if "accepted and ignored" in message]
    assert len(ignored) == 1 and all(name in ignored[0] for name in ("logit_bias_x", "user", "vendor_flag"))
    assert not any("secret" in message for message in caplog.messages), caplog.messages


async def test_thinking_model_returns_reasoning_content(client: AsyncOpenAI, stubControl: httpx.Client) -> None:
    completion = await client.chat.completions.create(model=REASONING, messages=HELLO)
    message = completion.choices[0].message
    assert "Hallo Welt" in message.model_extra["reasoning_content"]
    assert message.content == REPLY_TEMPLATE.format(prompt="Hallo Welt")
    assert upstreamChats(stubControl)[-1]["body"]["think"] is True  # always explicit for a thinking model
    stream = await client.chat.completions.create(model=REASONING, messages=HELLO, stream=True,
                                                  reasoning_effort="high")
    deltas = [chunk.choices[0].delta async for chunk in stream if chunk.choices]
    reasoning = "".join((delta.model_extra or {}).get("reasoning_content") or "" for delta in deltas)
    assert reasoning == message.model_extra["reasoning_content"]
    assert upstreamChats(stubControl)[-1]["body"]["think"] is True


async def test_reasoning_effort_on_a_plain_model_is_dropped(client: AsyncOpenAI, stubControl) -> None:
    completion = await client.chat.completions.create(model=TEXT, messages=HELLO, reasoning_effort="low")
    assert completion.choices[0].message.content and "think" not in upstreamChats(stubControl)[-1]["body"]


# ------------------------------------------------------------------------------ embeddings


async def test_embeddings_float_base64_and_dimensions(client: AsyncOpenAI) -> None:
    floats = await client.embeddings.create(model=EMBED, input=["Erster Satz", "Zweiter Satz"],
                                            encoding_format="float")
    assert [item.index for item in floats.data] == [0, 1] and len(floats.data[0].embedding) == 768
    assert floats.model == EMBED and floats.usage.prompt_tokens == 4 and floats.usage.total_tokens == 4
    packed = await client.embeddings.create(model=EMBED, input="Erster Satz", encoding_format="base64")
    unpacked = struct.unpack("<768f", base64.b64decode(packed.data[0].embedding))
    assert unpacked == pytest.approx(floats.data[0].embedding, abs=1e-6)
    sdkDefault = await client.embeddings.create(model=EMBED, input="Erster Satz")  # the SDK asks for base64
    assert sdkDefault.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    short = await client.embeddings.create(model=EMBED, input="Erster Satz", dimensions=256)
    assert len(short.data[0].embedding) == 256
    assert sum(value * value for value in short.data[0].embedding) == pytest.approx(1.0, abs=1e-6)


async def test_embeddings_with_a_chat_model_are_400(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model=TEXT, input="x")
    assert "not an embedding model" in info.value.message


# ------------------------------------------------------------------------------ errors


async def test_unknown_model_is_not_found(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert info.value.body["code"] == "model_not_found" and "Available models" in info.value.message


async def test_wrong_key_is_authentication_error(stub: StubServer, makeSettings) -> None:
    app = createApp(makeSettings(ollama={"base_url": stub.baseUrl}))
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app))
        async with AsyncOpenAI(base_url="http://service/v1", api_key="wrong", http_client=http) as sdk:
            with pytest.raises(openai.AuthenticationError) as info:
                await sdk.chat.completions.create(model=TEXT, messages=HELLO)
    assert info.value.body["type"] == "authentication_error"


async def test_rate_limited_key_gets_rate_limit_error_with_retry_after(stub: StubServer, makeSettings) -> None:
    settings = makeSettings(ollama={"base_url": stub.baseUrl},
                            ratelimit={"openai_burst": 1, "openai_requests_per_minute": 2})
    async for _, sdk in openService(settings):
        await sdk.chat.completions.create(model=TEXT, messages=HELLO)
        with pytest.raises(openai.RateLimitError) as info:
            await sdk.chat.completions.create(model=TEXT, messages=HELLO)
    assert info.value.status_code == 429 and info.value.body["type"] == "rate_limit_error"
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 30


async def test_midstream_failure_raises_in_the_sdk_stream(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=TEXT, messages=[{"role": "user", "content": "Bitte [[midstream-error]]"}], stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.append(chunk)
    assert "failed while generating" in info.value.message and MIDSTREAM_ERROR not in info.value.message
    assert len(received) >= 2


async def test_truncated_upstream_stream_is_an_error_not_a_clean_end(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=TEXT, messages=[{"role": "user", "content": "Bitte [[truncate]]"}], stream=True)
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            pass
    assert "ended before it was complete" in info.value.message


async def test_upstream_failure_without_stream_is_502(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": "[[midstream-error]]"}])
    assert info.value.status_code == 502 and MIDSTREAM_ERROR not in info.value.message


async def test_busy_ollama_is_503_with_retry_after(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": "[[busy]]"}],
                                             stream=True)
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"]


@pytest.mark.parametrize(("body", "param"), [
    ({"model": TEXT, "messages": HELLO, "n": 3}, "n"),
    ({"model": TEXT, "messages": HELLO, "temperature": 9}, "temperature"),
    ({"model": TEXT}, "messages"),
    ({"messages": HELLO}, "model"),
])
async def test_invalid_requests_are_400_in_openai_shape(client: AsyncOpenAI, body: dict, param: str) -> None:
    response = await client._client.post("http://service/v1/chat/completions", json=body,
                                         headers={"Authorization": f"Bearer {OPENAI_KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.mark.parametrize("field", ["seed", "max_tokens", "max_completion_tokens", "top_k"])
async def test_oversized_integers_are_400_not_500(client: AsyncOpenAI, stubControl: httpx.Client,
                                                  field: str) -> None:
    for value in (2**70, 2**64 - 1):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=TEXT, messages=HELLO, extra_body={field: value})
        assert info.value.body["param"] == field and "must be an integer from" in info.value.message
    assert upstreamChats(stubControl) == []


async def test_oversized_embedding_dimensions_are_400_not_500(client: AsyncOpenAI) -> None:
    for dimensions in (2**70, 2**64 - 1, 16385):
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model=EMBED, input="x", dimensions=dimensions)
        assert info.value.body["param"] == "dimensions" and "from 1 to 16,384" in info.value.message


async def test_body_that_is_not_json_is_400_in_openai_shape(client: AsyncOpenAI) -> None:
    response = await client._client.post("http://service/v1/chat/completions", content=b"{nope",
                                         headers={"Authorization": f"Bearer {OPENAI_KEY}"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
