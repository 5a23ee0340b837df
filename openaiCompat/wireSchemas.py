"""Wire schemas of the OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/embeddings)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from core.wire import (
    OPENAI_MODEL_ERRORS,
    OpenAiError,
    OpenWireModel,
    WireModel,
    jsonOf,
    omitted,
    operationDoc,
    ref,
    sseContent,
)
from openaiCompat.basics import DIMENSIONS_RANGE, MAX_EMBEDDING_INPUTS, MAX_TOKENS_RANGE, SEED_RANGE, TOP_K_RANGE

# ------------------------------------------------------------------------------------------------ OpenAI API

ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
NonEmpty = Annotated[str, Field(min_length=1)]
ModelName = Annotated[str, Field(min_length=1, pattern=r"\S", description="A name from GET /v1/models")]
MaxTokens = Annotated[int, Field(ge=MAX_TOKENS_RANGE[0], le=MAX_TOKENS_RANGE[1])]


class ModelObject(WireModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(WireModel):
    object: Literal["list"]
    data: list[ModelObject]


class ImageUrl(OpenWireModel):
    url: str = Field(description="data:image/...;base64,<data>; remote URLs are refused")
    detail: str | None = None


class TextPart(OpenWireModel):
    type: Literal["text", "input_text", "output_text"]
    text: str


class ImagePart(OpenWireModel):
    type: Literal["image_url", "input_image"]
    image_url: ImageUrl | str


class FileData(OpenWireModel):
    file_data: str = Field(description="data:image/...;base64,<data> (PDFs go to POST /api/analyze)")
    filename: str | None = None


class FilePart(OpenWireModel):
    type: Literal["file"]
    file: FileData


class RefusalPart(OpenWireModel):
    type: Literal["refusal"]
    refusal: str | None = None


ContentPart = TextPart | ImagePart | FilePart | RefusalPart
Content = str | list[ContentPart] | None


class FunctionCall(OpenWireModel):
    name: NonEmpty
    arguments: str | dict[str, Any] | None = Field(None, description="A JSON object, encoded as a string")


class ToolCall(OpenWireModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenWireModel):
    role: ChatRole
    content: Content = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: earlier tool calls")
    tool_call_id: str | None = Field(None, description="tool: the id of the call this result answers")
    reasoning_content: str | None = Field(None, description="assistant: earlier reasoning (sent back as thinking)")


class FunctionDefinition(OpenWireModel):
    name: NonEmpty
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments")


class Tool(OpenWireModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FlatTool(FunctionDefinition):
    """A Responses-API tool: name and parameters at the top level."""

    type: Literal["function"] = "function"


class NamedFunction(OpenWireModel):
    name: str


class NamedToolChoice(OpenWireModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(OpenWireModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="A JSON Schema with local $refs only")
    strict: bool | None = None


class ResponseFormat(OpenWireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(OpenWireModel):
    include_usage: bool | None = None


class ChatParameters(OpenWireModel):
    """What a chat request may carry besides its messages; unknown fields are accepted and ignored."""

    model: Annotated[ModelName, Field(examples=["poweron-text-general"])]
    stream: bool | None = None
    stream_options: StreamOptions | None = Field(None, description="include_usage: a usage chunk before [DONE]")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0, le=10)] | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = Field(None, description="Wins over max_tokens")
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    top_k: Annotated[int, Field(ge=TOP_K_RANGE[0], le=TOP_K_RANGE[1])] | None = None
    stop: NonEmpty | list[NonEmpty] | None = None
    n: Literal[1] | None = Field(None, description="Only 1: one choice per request")
    response_format: ResponseFormat | None = None
    tools: list[Tool | FlatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | NamedFunction | None = None
    reasoning_effort: ReasoningEffort | None = Field(None, description="Ollama's think; dropped on models that "
                                                                       "cannot think")


class ChatCompletionRequest(ChatParameters):
    """OpenAI Chat Completions."""

    messages: list[ChatMessage] = Field(min_length=1)


class ResponsesItem(OpenWireModel):
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: ChatRole | None = None
    content: Content = None
    call_id: str | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ReasoningOptions(OpenWireModel):
    effort: ReasoningEffort | None = None


class TextFormat(OpenWireModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(OpenWireModel):
    format: TextFormat | None = None


class ResponsesShapedRequest(ChatParameters):
    """A Responses-API body posted to /v1/chat/completions (Cursor does so); answered as a chat completion."""

    input: str | list[ResponsesItem]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    reasoning: ReasoningOptions | None = None
    text: TextOptions | None = None


class FunctionCallOut(WireModel):
    name: str
    arguments: str = Field(description="A JSON object, encoded as a string")


class ToolCallOut(WireModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(WireModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] = omitted()
    reasoning_content: str = omitted("The reasoning of thinking models")


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(WireModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatUsage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(WireModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: ChatUsage


class ToolCallDelta(ToolCallOut):
    index: int


class ChatDelta(WireModel):
    role: Literal["assistant"] = omitted()
    content: str = omitted()
    reasoning_content: str = omitted()
    tool_calls: list[ToolCallDelta] = omitted()


class ChunkChoice(WireModel):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(WireModel):
    """One SSE event of a streamed chat completion (choices is empty in the usage chunk)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: ChatUsage = omitted("Only in the last chunk, with stream_options.include_usage")


class EmbeddingRequest(OpenWireModel):
    """OpenAI Embeddings on poweron-embed."""

    model: Annotated[ModelName, Field(examples=["poweron-embed"])]
    input: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] = Field(
        description="Text or texts; token arrays are not supported")
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=DIMENSIONS_RANGE[0], le=DIMENSIONS_RANGE[1])] | None = None


class Embedding(WireModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or little-endian float32 in base64")


class EmbeddingUsage(WireModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(WireModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def openAiModelsDoc() -> dict[str, Any]:
    return operationDoc(jsonOf(ModelList), (401, 429), OpenAiError, okDescription="The models available now")

def openAiModelDoc() -> dict[str, Any]:
    return operationDoc(jsonOf(ModelObject), (401, 404, 429), OpenAiError, okDescription="The model")

def chatCompletionsDoc() -> dict[str, Any]:
    hello = {"model": "poweron-text-general", "messages": [{"role": "user", "content": "Hello"}]}
    examples = {"chat": hello, "streamed": {**hello, "stream": True, "stream_options": {"include_usage": True}},
                "tools": {**hello, "tools": [{"type": "function", "function": {
                    "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]},
                "responsesShaped": {"model": "poweron-text-general", "input": "Hello", "instructions": "Be brief"}}
    body = jsonOf({"anyOf": [ref(ChatCompletionRequest), ref(ResponsesShapedRequest)]}, examples)
    ok = {**jsonOf(ChatCompletion),
          "text/event-stream": sseContent((ChatCompletionChunk, OpenAiError), doneMarker="[DONE]")}
    return operationDoc(ok, OPENAI_MODEL_ERRORS, OpenAiError, body, "A chat completion, or its chunks with stream")

def embeddingsDoc() -> dict[str, Any]:
    examples = {"one": {"model": "poweron-embed", "input": "Rechnung"},
                "base64": {"model": "poweron-embed", "input": ["a", "b"], "encoding_format": "base64",
                           "dimensions": 256}}
    return operationDoc(jsonOf(EmbeddingList), OPENAI_MODEL_ERRORS, OpenAiError, jsonOf(EmbeddingRequest, examples),
                        "The embeddings")
