"""From validated requests to what the tokenizer and chat template take (runs off the loop).

Rules for big prompts (one request must not freeze the others, issue 16):

- With `context_window` given, a prompt whose cheap lower bound on its token count (the
  tokenizer's `min_token_count`: ceil(bytes / longest token), no tokenizing) reaches the window is
  refused at once with the same 400 context_length_exceeded that counting would give.
- Texts are tokenized through `long_text.encode_text`: long ones in pieces (identical ids),
  stopping once the count reaches the window, one long tokenization at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..engine.tokens import ChatTemplate, Tokenizer
from ..errors import InvalidRequestError
from ..protocol.chat import ChatCompletionRequest, ChatMessage, content_text
from ..protocol.openai import to_json
from ..protocol.tokenize import TokenizeChatRequest, TokenizeRequest
from .long_text import encode_text, too_long


def check_bound(text: str, tokenizer: Tokenizer, context_window: int | None, param: str) -> None:
    """Raise context_length_exceeded when `text` cannot fit `context_window`, by the tokenizer's
    cheap lower bound (tokenizers without `min_token_count` give none)."""
    if context_window is None:
        return
    bound = getattr(tokenizer, "min_token_count", None)
    at_least = int(bound(text)) if bound is not None else 0
    if at_least >= context_window:
        raise too_long(context_window, at_least, param)


def messages_for_template(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the dicts HF chat templates expect; text parts joined into one string; an
    assistant's `reasoning` (vLLM's name) given as `reasoning_content` (the templates' name)."""
    out = []
    for message in messages:
        item = to_json(message)
        if "content" in item and item["content"] is not None:
            item["content"] = content_text(message.content)
        if "reasoning" in item:
            item.setdefault("reasoning_content", item.pop("reasoning"))
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
    template_kwargs: Mapping[str, Any] | None = None,
    context_window: int | None = None,
) -> tuple[str, list[int]]:
    """The rendered chat as (text, token ids); the text says whether the prompt opens a think
    block (server/reasoning.py). With `context_window`, a prompt that would leave no room in it
    is refused (400, param "messages") by the cheap bound or as soon as counting shows it.
    `template_kwargs` (chat_template_kwargs) are extra variables for a jinja template."""
    text = template.render(
        messages_for_template(messages),
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        template_kwargs=template_kwargs,
    )
    check_bound(text, tokenizer, context_window, "messages")
    ids = encode_text(
        text,
        tokenizer,
        add_special_tokens=add_special_tokens,
        stop_at=context_window,
        param="messages",
    )
    return text, ids


class PromptList(Protocol):
    """A request holding a batch of prompts (completions, embeddings)."""

    @property
    def prompts(self) -> tuple[str | tuple[int, ...], ...]: ...

    @property
    def add_special_tokens(self) -> bool | None: ...


def prompt_token_lists(
    req: PromptList,
    tokenizer: Tokenizer,
    context_window: int | None = None,
    *,
    keep_last: int | None = None,
    param: str = "prompt",
) -> list[list[int]]:
    """Each prompt of a request as token ids (strings get the tokenizer's BOS unless
    add_special_tokens is false). With `context_window`, every prompt is checked by the cheap
    bound before any is tokenized, and a prompt that leaves no room in the window is refused
    (400, `param`). With `keep_last`, each prompt keeps its last `keep_last` tokens instead (vLLM's
    truncate_prompt_tokens) and is not checked against the window."""
    vocab = tokenizer.vocab_size
    window = context_window if keep_last is None else None
    for prompt in req.prompts:
        if isinstance(prompt, str):
            check_bound(prompt, tokenizer, window, param)
        elif window is not None and len(prompt) >= window:
            raise too_long(window, len(prompt), param)
    out: list[list[int]] = []
    for k, prompt in enumerate(req.prompts):
        if isinstance(prompt, str):
            ids = encode_text(
                prompt,
                tokenizer,
                add_special_tokens=req.add_special_tokens is not False,
                stop_at=window,
                param=param,
            )
        else:
            ids = list(prompt)
            for token in ids:
                if token >= vocab:
                    raise InvalidRequestError(
                        f"Token id {token} in {param} {k} is outside the vocabulary "
                        f"(0..{vocab - 1}).",
                        param=param,
                    )
        if not ids:
            raise InvalidRequestError(f"Prompt {k} is empty.", param=param)
        out.append(ids if keep_last is None else ids[-keep_last:])
    return out


def tokenize(req: TokenizeRequest, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
    if isinstance(req, TokenizeChatRequest):
        _, ids = render_chat(
            req.messages,
            None,
            template,
            tokenizer,
            add_generation_prompt=(
                True if req.add_generation_prompt is None else req.add_generation_prompt
            ),
            add_special_tokens=bool(req.add_special_tokens),
        )
        return ids
    add = True if req.add_special_tokens is None else req.add_special_tokens
    return encode_text(req.prompt, tokenizer, add_special_tokens=add)
