"""POST /v1/responses: the chat completion request equivalent to a Responses request.

Rules: `to_chat_request` maps a validated request onto a `ChatCompletionRequest`, so the chat
pipeline (template, tools, constraints, sampling, reasoning) serves it unchanged:
- `instructions` becomes the first system message; consecutive function_call items one assistant
  message with `tool_calls`; a function_call_output a tool message; `text.format` the matching
  `response_format`;
- a reasoning item (as a reply gave it, sent back) is the `reasoning_content` of the assistant
  message that follows it (a message, or function calls: then they start a new assistant
  message); `reasoning.effort` is chat's `reasoning_effort`, a chat template variable.
"""

from __future__ import annotations

import attrs

from mlctrio.protocol import chat
from mlctrio.protocol.responses import (
    FunctionCallOutputItem,
    FunctionTool,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    TextFormat,
    TextFormatJsonObject,
    TextFormatJsonSchema,
    ToolChoice,
    ToolChoiceFunction,
)


def _message(item: MessageItem) -> chat.ChatMessage:
    text = item.text
    if item.role == "user":
        return chat.UserMessage("user", text)
    if item.role == "system":
        return chat.SystemMessage("system", text)
    if item.role == "developer":
        return chat.DeveloperMessage("developer", text)
    return chat.AssistantMessage("assistant", text)


def chat_messages(req: ResponsesRequest) -> tuple[chat.ChatMessage, ...]:
    """The conversation as chat messages (see the module rules)."""
    out: list[chat.ChatMessage] = []
    if req.instructions is not None:
        out.append(chat.SystemMessage("system", req.instructions))
    items = (
        (MessageItem(type="message", role="user", content=req.input),)
        if isinstance(req.input, str)
        else req.input
    )
    reasoning: str | None = None  # a reasoning item's text, for the next assistant message
    for item in items:
        if isinstance(item, ReasoningItem):
            reasoning = (reasoning or "") + item.text
        elif isinstance(item, MessageItem):
            message = _message(item)
            if isinstance(message, chat.AssistantMessage) and reasoning is not None:
                message, reasoning = attrs.evolve(message, reasoning_content=reasoning), None
            out.append(message)
        elif isinstance(item, FunctionCallOutputItem):
            out.append(chat.ToolMessage("tool", item.text, item.call_id))
        else:
            call = chat.ToolCall(
                item.call_id, "function", chat.FunctionCall(item.name, item.arguments)
            )
            last = out[-1] if out else None
            if isinstance(last, chat.AssistantMessage) and reasoning is None:  # one turn
                out[-1] = attrs.evolve(last, tool_calls=(*(last.tool_calls or ()), call))
            else:
                out.append(
                    chat.AssistantMessage(
                        "assistant", None, tool_calls=(call,), reasoning_content=reasoning
                    )
                )
                reasoning = None
    return tuple(out)


def _response_format(fmt: TextFormat) -> chat.ResponseFormat:
    if isinstance(fmt, TextFormatJsonSchema):
        spec = chat.JsonSchemaSpec(fmt.name, fmt.description, fmt.schema, fmt.strict)
        return chat.ResponseFormatJsonSchema("json_schema", spec)
    if isinstance(fmt, TextFormatJsonObject):
        return chat.ResponseFormatJsonObject("json_object")
    return chat.ResponseFormatText("text")


def _tool(tool: FunctionTool) -> chat.Tool:
    fn = chat.FunctionDefinition(tool.name, tool.description, tool.parameters, tool.strict)
    return chat.Tool("function", fn)


def _tool_choice(choice: ToolChoice | None) -> chat.ToolChoice | None:
    if isinstance(choice, ToolChoiceFunction):
        return chat.NamedToolChoice("function", chat.FunctionName(choice.name))
    return choice


def to_chat_request(req: ResponsesRequest) -> chat.ChatCompletionRequest:
    """The chat completion request that generates this response (validated already)."""
    return chat.ChatCompletionRequest(
        model=req.model,
        messages=chat_messages(req),
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stream=req.stream,
        user=req.user,
        response_format=_response_format(req.text_format),
        tools=tuple(_tool(t) for t in req.tools) if req.tools else None,
        tool_choice=_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls,
        reasoning_effort=req.reasoning.effort if req.reasoning is not None else None,
    )
