"""From validated requests to what the tokenizer and chat template take (runs off the loop)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine.tokens import ChatTemplate, Tokenizer
from ..errors import InvalidRequestError
from ..protocol.chat import ChatCompletionRequest, ChatMessage, content_text
from ..protocol.completions import CompletionRequest
from ..protocol.openai import to_json
from ..protocol.tokenize import TokenizeChatRequest, TokenizeRequest


def messages_for_template(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the dicts HF chat templates expect; text parts joined into one string."""
    out = []
    for message in messages:
        item = to_json(message)
        if "content" in item and item["content"] is not None:
            item["content"] = content_text(message.content)
        out.append(item)
    return out


def tools_for_template(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    return [to_json(tool) for tool in req.tools]


def render_chat(
    messages: Sequence[ChatMessage],
    tools: list[dict[str, Any]] | None,
    template: ChatTemplate,
    tokenizer: Tokenizer,
    *,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
) -> list[int]:
    text = template.render(
        messages_for_template(messages), tools=tools, add_generation_prompt=add_generation_prompt
    )
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def prompt_token_lists(req: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """Each prompt of a completion request as token ids (strings get the tokenizer's BOS)."""
    vocab = tokenizer.vocab_size
    out: list[list[int]] = []
    for k, prompt in enumerate(req.prompts):
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
            for token in ids:
                if token >= vocab:
                    raise InvalidRequestError(
                        f"Token id {token} in prompt {k} is outside the vocabulary "
                        f"(0..{vocab - 1}).",
                        param="prompt",
                    )
        if not ids:
            raise InvalidRequestError(f"Prompt {k} is empty.", param="prompt")
        out.append(ids)
    return out


def tokenize(req: TokenizeRequest, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
    if isinstance(req, TokenizeChatRequest):
        return render_chat(
            req.messages,
            None,
            template,
            tokenizer,
            add_generation_prompt=(
                True if req.add_generation_prompt is None else req.add_generation_prompt
            ),
            add_special_tokens=bool(req.add_special_tokens),
        )
    add = True if req.add_special_tokens is None else req.add_special_tokens
    return tokenizer.encode(req.prompt, add_special_tokens=add)
