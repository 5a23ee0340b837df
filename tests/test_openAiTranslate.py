"""openaiCompat: OpenAI chat/embeddings bodies to Ollama payloads and back, without any network."""

from __future__ import annotations

import base64
import io
import struct
from dataclasses import replace

import orjson
import pytest
from PIL import Image

from config import MODEL_MAPPING, LimitsSettings, OllamaSettings, Settings
from core.errors import ServiceError
from openaiCompat.chatRequest import buildChatPlan
from openaiCompat.chatResponse import ChatStreamTranslator, chatCompletion
from openaiCompat.embeddings import embeddingInputs, embeddingOptions, embeddingResponse
from openaiCompat.images import ImageRules, decodeImageDataUrl
from openaiCompat.messages import translateMessages
from upstream.modelRegistry import ResolvedModel

WINDOW = 8192  # what the registry resolves with [ollama] num_ctx = 8192 (upstream/contextWindow.py)
TEXT = ResolvedModel(MODEL_MAPPING["poweron-text-general"], "qwen2.5:7b", frozenset({"completion", "tools"}),
                     window=WINDOW)
VISION = ResolvedModel(MODEL_MAPPING["poweron-vision-general"], "qwen2.5vl:7b", frozenset({"completion", "vision"}),
                       window=WINDOW)
ONE_IMAGE = ResolvedModel(MODEL_MAPPING["poweron-vision-deep"], "granite3.2-vision:latest",
                          frozenset({"completion", "vision", "tools"}), window=WINDOW)
THINKER = ResolvedModel(MODEL_MAPPING["poweron-text-reasoning"], "deepseek-r1:70b",
                        frozenset({"completion", "thinking"}), window=WINDOW)
GPT_OSS = ResolvedModel(MODEL_MAPPING["poweron-text-reasoning"], "gpt-oss:20b",
                        frozenset({"completion", "tools", "thinking"}), window=WINDOW)
EMBED = ResolvedModel(MODEL_MAPPING["poweron-embed"], "nomic-embed-text:latest", frozenset({"embedding"}),
                      window=2048)
USER = [{"role": "user", "content": "Hallo"}]
TOOL = {"type": "function", "function": {"name": "getWeather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
OTHER_TOOL = {"type": "function", "function": {"name": "getTime", "parameters": {"type": "object"}}}


def settingsWith(maxPixels: int = 50_000_000, numCtx: int = 8192, keepAlive: str = "30m") -> Settings:
    """Settings without any file or environment (pure unit tests)."""
    return Settings.model_construct(limits=LimitsSettings(max_image_pixels=maxPixels),
                                    ollama=OllamaSettings(num_ctx=numCtx, keep_alive=keepAlive))


def plan(body: dict, resolved: ResolvedModel = TEXT, maxPixels: int = 50_000_000):
    return buildChatPlan({"model": resolved.externalName, **body}, resolved, settingsWith(maxPixels))


def rejected(body: dict, resolved: ResolvedModel = TEXT, maxPixels: int = 50_000_000) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        plan(body, resolved, maxPixels)
    return info.value


def dataUrl(width: int, height: int, fmt: str = "PNG", mime: str = "image/png") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, fmt)
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def imageMessage(*urls: str, text: str = "Was steht da?") -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


# ------------------------------------------------------------------------------ parameters


def test_absent_parameters_are_not_sent_so_model_defaults_stand() -> None:
    payload = plan({"messages": USER, "temperature": None, "max_tokens": None, "top_p": None}).payload
    assert payload == {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "Hallo"}],
                       "keep_alive": "30m", "options": {"num_ctx": 8192}}


def test_sampling_parameters_map_to_ollama_options() -> None:
    payload = plan({"messages": USER, "temperature": 0.2, "top_p": 0.9, "max_tokens": 100, "seed": 7,
                    "presence_penalty": 0.5, "frequency_penalty": -0.5, "stop": "END", "top_k": 20}).payload
    assert payload["options"] == {"num_ctx": 8192, "temperature": 0.2, "top_p": 0.9, "num_predict": 100,
                                  "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5, "stop": ["END"],
                                  "top_k": 20}


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert plan({"messages": USER, "max_completion_tokens": 5, "max_tokens": 50}).payload["options"]["num_predict"] == 5
    assert plan({"messages": USER, "max_completion_tokens": None, "max_tokens": 50}).payload["options"][
        "num_predict"] == 50


def test_num_ctx_zero_sends_no_num_ctx() -> None:
    payload = buildChatPlan({"model": "x", "messages": USER}, replace(TEXT, window=0),
                            settingsWith(numCtx=0, keepAlive="5m")).payload
    assert "options" not in payload and payload["keep_alive"] == "5m"


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 3), ("temperature", "hot"), ("top_p", 1.5), ("max_tokens", 0), ("max_tokens", 2.5),
    ("stop", ["", "x"]), ("stop", 5), ("seed", "a"), ("presence_penalty", True), ("stream", "yes"),
])
def test_bad_parameter_values_are_400_naming_the_parameter(field: str, value: object) -> None:
    error = rejected({"messages": USER, field: value})
    assert error.status == 400 and error.param == field and f"`{field}`" in error.message


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 2**70), ("seed", 2**63), ("seed", -(2**63) - 1), ("max_tokens", 2**70), ("max_tokens", 1_000_001),
    ("max_completion_tokens", 2**64), ("max_completion_tokens", 1e30), ("top_k", 2**70), ("top_k", 1001),
    ("top_k", 0),
])
def test_oversized_integers_are_400_naming_the_parameter_and_its_range(field: str, value: object) -> None:
    error = rejected({"messages": USER, field: value})
    assert (error.status, error.param) == (400, field)
    assert f"`{field}` must be an integer from" in error.message


def test_integers_at_the_documented_bounds_pass_and_serialise() -> None:
    huge = replace(TEXT, window=2_000_000)  # a window the bound's answer budget fits into
    options = plan({"messages": USER, "seed": 2**63 - 1, "max_tokens": 1_000_000, "top_k": 1000},
                   huge).payload["options"]
    assert (options["seed"], options["num_predict"], options["top_k"]) == (2**63 - 1, 1_000_000, 1000)
    assert plan({"messages": USER, "seed": -1}).payload["options"]["seed"] == -1
    orjson.dumps(options)


@pytest.mark.parametrize("dimensions", [2**70, 16385, 0, -3])
def test_embedding_dimensions_out_of_range_are_400(dimensions: int) -> None:
    with pytest.raises(ServiceError) as info:
        embeddingOptions({"dimensions": dimensions})
    assert (info.value.status, info.value.param) == (400, "dimensions")
    assert "from 1 to 16,384" in info.value.message
    assert embeddingOptions({"dimensions": 16384}) == (False, 16384)


def test_n_above_one_is_refused_and_unknown_fields_are_ignored() -> None:
    error = rejected({"messages": USER, "n": 2})
    assert error.status == 400 and error.param == "n"
    payload = plan({"messages": USER, "n": 1, "user": "u-1", "logit_bias": {}, "metadata": {"a": 1}}).payload
    assert set(payload) == {"model", "messages", "keep_alive", "options"}


@pytest.mark.parametrize(("schema", "text"), [
    ({"type": "strng"}, "not a valid JSON Schema"),
    ({"type": "object", "properties": {"a": {"minLength": "five"}}}, "not a valid JSON Schema at properties/a"),
    ({"$ref": "https://example.com/invoice.json"}, "only local references"),
    ({"type": "object", "properties": {"a": {"$ref": "file:///etc/passwd"}}}, "only local references"),
    ({"$schema": []}, "$schema must be a string"),  # found by the fuzzer: was a 500 (unhashable type)
    ({"$schema": 5}, "$schema must be a string"),
    ({"type": "object", "properties": {"a": {"$schema": 5}}}, "not a valid JSON Schema at properties/a"),
])
def test_invalid_json_schema_in_response_format_is_400(schema: dict, text: str) -> None:
    error = rejected({"messages": USER, "response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "x", "schema": schema}}})
    assert (error.status, error.param, error.code) == (400, "response_format", "invalid_schema")
    assert text in error.message and error.message.startswith("`response_format.json_schema.schema`: ")


def test_response_format_maps_to_ollama_format() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    asSchema = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    assert plan({"messages": USER, "response_format": asSchema}).payload["format"] == schema
    assert plan({"messages": USER, "response_format": {"type": "json_object"}}).payload["format"] == "json"
    assert "format" not in plan({"messages": USER, "response_format": {"type": "text"}}).payload
    assert rejected({"messages": USER, "response_format": {"type": "xml"}}).param == "response_format.type"


def test_stream_options_include_usage_only_counts_when_streaming() -> None:
    assert plan({"messages": USER, "stream": True, "stream_options": {"include_usage": True}}).includeUsage
    assert not plan({"messages": USER, "stream": False, "stream_options": {"include_usage": True}}).includeUsage
    assert not plan({"messages": USER, "stream": True}).includeUsage


# ------------------------------------------------------------------------------ tools


def test_tools_pass_through_and_tool_choice_none_removes_them() -> None:
    assert plan({"messages": USER, "tools": [TOOL]}).payload["tools"][0]["function"]["name"] == "getWeather"
    assert "tools" not in plan({"messages": USER, "tools": [TOOL], "tool_choice": "none"}).payload


def test_named_tool_choice_keeps_only_that_function() -> None:
    choice = {"type": "function", "function": {"name": "getTime"}}
    tools = plan({"messages": USER, "tools": [TOOL, OTHER_TOOL], "tool_choice": choice}).payload["tools"]
    assert [tool["function"]["name"] for tool in tools] == ["getTime"]
    missing = rejected({"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function",
                                                                            "function": {"name": "nope"}}})
    assert missing.param == "tool_choice" and "nope" in missing.message


def test_tool_choice_required_sends_the_tools_best_effort() -> None:
    assert len(plan({"messages": USER, "tools": [TOOL, OTHER_TOOL], "tool_choice": "required"}).payload["tools"]) == 2


def test_tools_for_a_model_without_tool_support_are_400() -> None:
    error = rejected({"messages": USER, "tools": [TOOL]}, VISION)
    assert error.status == 400 and "poweron-vision-general" in error.message and "tools" in error.message


def test_tool_calls_round_trip_with_tool_name_from_tool_call_id() -> None:
    messages = [
        {"role": "user", "content": "Wetter in Bonn?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "getWeather", "arguments": '{"city":"Bonn"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 Grad"},
    ]
    converted, _ = translateMessages(messages, ImageRules("x", False, settingsWith(), 0))
    assert converted[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "function": {"name": "getWeather", "arguments": {"city": "Bonn"}}}]}
    assert converted[2] == {"role": "tool", "content": "12 Grad", "tool_name": "getWeather", "tool_call_id": "call_1"}


def test_tool_call_arguments_that_are_not_a_json_object_are_400() -> None:
    messages = [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1"}}]}]
    error = rejected({"messages": messages})
    assert error.param == "messages[0].tool_calls[0].function.arguments"


def test_roles_map_developer_to_system_and_bad_roles_are_400() -> None:
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Sei knapp."}]}, *USER]
    assert plan({"messages": messages}).payload["messages"][0] == {"role": "system", "content": "Sei knapp."}
    assert rejected({"messages": [{"role": "robot", "content": "x"}]}).param == "messages[0].role"
    assert rejected({"messages": []}).param == "messages"


# ------------------------------------------------------------------------------ reasoning


def test_reasoning_effort_maps_to_think_and_thinking_models_always_get_one() -> None:
    assert plan({"messages": USER}, THINKER).payload["think"] is True  # explicit: Ollama < 0.12.4 defaults off
    assert plan({"messages": USER}, GPT_OSS).payload["think"] == "medium"
    assert "think" not in plan({"messages": USER}, TEXT).payload
    assert plan({"messages": USER, "reasoning_effort": "high"}, THINKER).payload["think"] is True
    assert plan({"messages": USER, "reasoning_effort": "none"}, THINKER).payload["think"] is False


def test_gpt_oss_gets_think_levels_and_cannot_switch_off() -> None:
    assert plan({"messages": USER, "reasoning_effort": "medium"}, GPT_OSS).payload["think"] == "medium"
    assert plan({"messages": USER, "reasoning_effort": "none"}, GPT_OSS).payload["think"] == "low"


def test_reasoning_effort_on_a_model_that_cannot_think_is_dropped() -> None:
    assert "think" not in plan({"messages": USER, "reasoning_effort": "high"}, TEXT).payload
    assert rejected({"messages": USER, "reasoning_effort": "max"}, THINKER).param == "reasoning_effort"


def test_assistant_reasoning_content_goes_back_as_thinking() -> None:
    messages = [*USER, {"role": "assistant", "content": "Hi", "reasoning_content": "Think"}, *USER]
    assert plan({"messages": messages}, THINKER).payload["messages"][1]["thinking"] == "Think"


# ------------------------------------------------------------------------------ images


def test_image_data_url_is_sent_as_raw_base64() -> None:
    url = dataUrl(40, 30)
    message = plan({"messages": imageMessage(url)}, VISION).payload["messages"][0]
    assert message == {"role": "user", "content": "Was steht da?", "images": [url.split(",", 1)[1]]}


def test_image_for_a_model_without_vision_is_400_naming_the_model() -> None:
    error = rejected({"messages": imageMessage(dataUrl(4, 4))}, TEXT)
    assert error.status == 400 and "`poweron-text-general` cannot read images" in error.message


@pytest.mark.parametrize(("url", "text"), [
    ("https://example.com/a.png", "never fetches https URLs"),
    ("file:///etc/passwd", "must be a data URL"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:text/plain;base64,aGFsbG8=", "must be a data URL"),
    ("data:image/png;base64,aGFsbG8=", "not a readable image"),
])
def test_bad_image_urls_are_400(url: str, text: str) -> None:
    error = rejected({"messages": imageMessage(url)}, VISION)
    assert error.status == 400 and text in error.message
    assert error.param == "messages[0].content[1].image_url.url"


def test_image_over_the_pixel_limit_is_413_before_decoding() -> None:
    error = rejected({"messages": imageMessage(dataUrl(200, 100))}, VISION, maxPixels=19_999)
    assert error.status == 413 and "200x100 = 20,000 pixels" in error.message
    assert error.param == "messages[0].content[1].image_url.url"


def test_formats_ollama_cannot_read_are_converted_to_png() -> None:
    url = dataUrl(16, 8, "GIF", "image/gif")
    image = plan({"messages": imageMessage(url)}, VISION).payload["messages"][0]["images"][0]
    with Image.open(io.BytesIO(base64.b64decode(image))) as decoded:
        assert decoded.format == "PNG" and decoded.size == (16, 8)


def test_too_many_images_per_message_for_the_model_are_400() -> None:
    error = rejected({"messages": imageMessage(dataUrl(4, 4), dataUrl(4, 4))}, ONE_IMAGE)
    assert error.status == 400 and "at most 1 image" in error.message


def test_pdf_file_parts_point_to_the_analysis_api_and_image_files_are_read() -> None:
    pdf = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQ="}}
    error = rejected({"messages": [{"role": "user", "content": [pdf]}]}, VISION)
    assert error.status == 400 and "/api/analyze" in error.message
    picture = {"type": "file", "file": {"file_data": dataUrl(5, 5)}}
    assert len(plan({"messages": [{"role": "user", "content": [picture]}]}, VISION).payload["messages"][0][
        "images"]) == 1


def test_decode_image_data_url_accepts_jpeg_unchanged() -> None:
    url = dataUrl(10, 10, "JPEG", "image/jpeg")
    assert decodeImageDataUrl(url, "p", settingsWith(maxPixels=10_000)) == url.split(",", 1)[1]


# ------------------------------------------------------------------------------ answers


def test_non_streaming_answer_has_openai_shape_with_tool_calls_and_reasoning() -> None:
    answer = {"message": {"role": "assistant", "content": "", "thinking": "Hmm",
                          "tool_calls": [{"id": "call_a", "function": {"name": "f", "arguments": {"x": 1}}}]},
              "done": True, "done_reason": "stop", "prompt_eval_count": 11, "eval_count": 4}
    completion = chatCompletion(answer, "poweron-text-general")
    choice = completion["choices"][0]
    assert completion["id"].startswith("chatcmpl-") and completion["model"] == "poweron-text-general"
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": None, "reasoning_content": "Hmm", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}]}
    assert completion["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    assert chatCompletion(answer, "m")["id"] != completion["id"]


def test_length_done_reason_is_finish_reason_length() -> None:
    answer = {"message": {"content": "abc"}, "done": True, "done_reason": "length"}
    assert chatCompletion(answer, "m")["choices"][0]["finish_reason"] == "length"


def frameData(frame: bytes) -> dict:
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    return orjson.loads(frame[6:])


def test_stream_translator_emits_role_deltas_tool_calls_finish_and_usage() -> None:
    translator = ChatStreamTranslator("poweron-text-general")
    role = frameData(translator.roleFrame())
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert translator.deltaFrame({"message": {"role": "assistant", "content": ""}, "done": False}) is None
    thought = frameData(translator.deltaFrame({"message": {"content": "", "thinking": "So"}, "done": False}))
    assert thought["choices"][0]["delta"] == {"reasoning_content": "So"}
    calls = [{"function": {"name": "f", "arguments": {}}}, {"id": "call_z", "function": {"name": "g", "arguments": {}}}]
    toolFrame = frameData(translator.deltaFrame({"message": {"content": "", "tool_calls": calls}, "done": False}))
    deltas = toolFrame["choices"][0]["delta"]["tool_calls"]
    assert [(d["index"], d["function"]["name"], d["function"]["arguments"]) for d in deltas] == [
        (0, "f", "{}"), (1, "g", "{}")]
    assert deltas[1]["id"] == "call_z" and deltas[0]["id"].startswith("call_")
    done = {"message": {"content": ""}, "done": True, "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 2}
    finish = frameData(translator.finishFrame(done))
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    usage = frameData(translator.usageFrame(done))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
    assert len({role["id"], finish["id"], usage["id"]}) == 1


# ------------------------------------------------------------------------------ embeddings


def test_embedding_inputs_and_options_are_checked() -> None:
    assert embeddingInputs("a") == ["a"] and embeddingInputs(["a", "b"]) == ["a", "b"]
    for bad in ([], [1, 2], "", [["x"]], None):
        with pytest.raises(ServiceError):
            embeddingInputs(bad)
    assert embeddingOptions({"encoding_format": "base64", "dimensions": 64}) == (True, 64)
    with pytest.raises(ServiceError):
        embeddingOptions({"encoding_format": "int8"})


def test_embedding_response_in_base64_and_shortened_to_dimensions() -> None:
    answer = {"embeddings": [[0.6, 0.8, 0.0, 0.0]], "prompt_eval_count": 3}
    floats = embeddingResponse(answer, "poweron-embed", False, None)
    assert floats["data"] == [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8, 0.0, 0.0]}]
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3} and floats["model"] == "poweron-embed"
    packed = embeddingResponse(answer, "poweron-embed", True, None)["data"][0]["embedding"]
    assert struct.unpack("<4f", base64.b64decode(packed)) == pytest.approx((0.6, 0.8, 0.0, 0.0))
    short = embeddingResponse({"embeddings": [[3.0, 4.0, 12.0]]}, "m", False, 2)["data"][0]["embedding"]
    assert short == pytest.approx([0.6, 0.8])


def test_chat_with_an_embedding_model_is_400() -> None:
    error = rejected({"messages": USER}, EMBED)
    assert error.status == 400 and "/v1/embeddings" in error.message


def test_responses_shaped_body_from_cursor_is_translated() -> None:
    body = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Fix it"}]},
                      {"type": "reasoning", "summary": []},
                      {"type": "function_call", "call_id": "c1", "name": "read_file", "arguments": '{"path":"a.py"}'},
                      {"type": "function_call_output", "call_id": "c1", "output": "print(1)"}],
            "instructions": "You are a coding agent.", "max_output_tokens": 64, "reasoning": {"effort": "low"},
            "tools": [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]}
    payload = plan(body, GPT_OSS).payload
    assert payload["messages"] == [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Fix it"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "function": {"name": "read_file", "arguments": {"path": "a.py"}}}]},
        {"role": "tool", "content": "print(1)", "tool_name": "read_file", "tool_call_id": "c1"}]
    assert payload["options"]["num_predict"] == 64 and payload["think"] == "low"
    assert payload["tools"][0]["function"]["name"] == "read_file"
    assert plan({"input": "Hallo"}).payload["messages"] == [{"role": "user", "content": "Hallo"}]


@pytest.mark.parametrize("delta, finish", [({"content": 'héllo "q" \\ \n'}, None), ({}, "stop"),
                                           ({"role": "assistant", "content": ""}, None),
                                           ({"reasoning_content": "hm", "content": "x"}, "length")])
def test_aChunkFrameIsTheWholeChunkObjectSerialised(delta: dict, finish: str | None) -> None:
    """The translator writes only the delta per frame (the rest is prebuilt): the bytes must be those of the whole
    ``chat.completion.chunk`` object, as a client parses it."""
    translator = ChatStreamTranslator('poweron-"odd"-name')
    frame = translator._frame(delta, finish)
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert orjson.loads(frame[6:]) == {
        "id": translator.completionId, "object": "chat.completion.chunk", "created": translator.created,
        "model": 'poweron-"odd"-name',
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
