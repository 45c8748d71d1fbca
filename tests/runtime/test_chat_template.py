"""Chat templates: MLC presets render the exact prompt strings, HF jinja templates render in a
sandbox like transformers, and load_chat_template picks HF, then conv_template, then chatml."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import gguf
import pytest

from mlctrio.errors import InvalidRequestError, ModelLoadError
from mlctrio.models.demo import CHAT_TEMPLATE
from mlctrio.runtime.chat_template import (
    ConvTemplate,
    HFChatTemplate,
    conv_template_from_config,
    load_chat_template,
)
from mlctrio.runtime.tool_prompt import TemplateCaps


@attrs.define
class FakeTokenizer:
    """Special tokens are single ids; every other character is one id (ord + 1000)."""

    specials: dict[str, int]
    bos_token_id: int | None = None
    eos_token_ids: Sequence[int] = ()

    @property
    def vocab_size(self) -> int:
        return 200_000

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.specials[text]] if text in self.specials else [ord(c) + 1000 for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        names = {v: k for k, v in self.specials.items()}
        return "".join(
            ("" if skip_special_tokens else names[i]) if i in names else chr(i - 1000)
            for i in token_ids
        )

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode([token_id], False).encode()

    def detokenizer(self, skip_special_tokens: bool = True) -> Any:
        raise NotImplementedError


QWEN = FakeTokenizer({"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
                     eos_token_ids=[151645])  # fmt: skip
LLAMA3 = FakeTokenizer(
    {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|eom_id|>": 128008,
     "<|eot_id|>": 128009},
    bos_token_id=128000, eos_token_ids=[128001, 128009],
)  # fmt: skip
MISTRAL = FakeTokenizer({"<s>": 1, "</s>": 2}, bos_token_id=1, eos_token_ids=[2])

CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": [{"type": "text", "text": "Weather "},
                                 {"type": "text", "text": "today?"}]},
]  # fmt: skip


def test_chatml_preset() -> None:
    t = conv_template_from_config("chatml", QWEN)
    assert t.render(CHAT) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWeather today?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert list(t.stop_strings) == ["<|im_end|>"]
    assert list(t.stop_token_ids) == [151645]
    # without a system message, MLC's default system prompt is used
    assert t.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
    )


def test_qwen2_preset_with_tools() -> None:
    t = conv_template_from_config("qwen2", QWEN)
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    ]  # fmt: skip
    assert t.render(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert set(t.stop_token_ids) == {151643, 151645}
    assert list(t.stop_strings) == ["<|endoftext|>", "<|im_end|>"]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    rendered = t.render(messages[:1], tools=tools)
    assert '"name": "weather"' in rendered and t.call_format == "hermes"
    assert '<tool_call>\n{"name": "tool_name", "arguments": {"arg1": "some_value"}}' in rendered
    assert rendered.index("weather") < rendered.index("<|im_start|>user")


def test_conv_presets_write_calls_in_the_format_the_parser_reads() -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    turn: list[dict[str, Any]] = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    chatml = conv_template_from_config("chatml", QWEN)
    assert chatml.call_format == "hermes"
    assert chatml.render(turn, add_generation_prompt=False).endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call><|im_end|>\n"
    )
    llama = conv_template_from_config("llama-3", LLAMA3)
    assert llama.call_format == "llama3_json"
    assert llama.render(turn, add_generation_prompt=False).endswith(
        '{"name": "weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    )
    mistral = conv_template_from_config("mistral", MISTRAL)
    assert mistral.call_format == "mistral"
    assert '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris"}}]' in mistral.render(
        [{"role": "user", "content": "?"}, *turn], add_generation_prompt=False
    )


def test_llama3_preset_bos_once() -> None:
    t = conv_template_from_config("llama-3", LLAMA3)
    assert t.render(CHAT[:2]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert t.render(CHAT).count("<|begin_of_text|>") == 1
    assert set(t.stop_token_ids) == {128001, 128008, 128009}
    tool_turn = t.render([{"role": "tool", "content": "42"}], add_generation_prompt=False)
    assert tool_turn.endswith("<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>")


def test_mistral_preset() -> None:
    t = conv_template_from_config("mistral_default", MISTRAL)
    assert t.render(CHAT) == (
        "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Weather today? [/INST]"
    )
    assert t.render(CHAT[1:2]) == "<s>[INST] Hi [/INST]"
    assert list(t.stop_token_ids) == [2] and list(t.stop_strings) == ["</s>"]
    assert conv_template_from_config("mistral", MISTRAL).render(CHAT) == t.render(CHAT)


def test_unknown_role_and_unsupported_part() -> None:
    t = conv_template_from_config("chatml", QWEN)
    with pytest.raises(InvalidRequestError, match="role 'robot'"):
        t.render([{"role": "robot", "content": "beep"}])
    with pytest.raises(InvalidRequestError, match="image_url"):
        t.render([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    with pytest.raises(ModelLoadError, match="unknown conv_template"):
        conv_template_from_config("no-such-template", QWEN)


def test_mlc_json_conv_template() -> None:
    # mlc-chat-config.json of a converted Llama-2 carries the whole Conversation object
    conv = {
        "name": "llama-2",
        "system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
        "system_message": "You are helpful.",
        "roles": {"user": "<s>[INST]", "assistant": "[/INST]", "tool": "[INST]"},
        "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}",
                           "tool": "{tool_message}"},
        "seps": [" ", " </s>"],
        "role_content_sep": " ",
        "role_empty_sep": " ",
        "stop_str": ["[INST]"],
        "stop_token_ids": [2],
        "system_prefix_token_ids": [1],
        "add_role_after_system_message": False,
    }  # fmt: skip
    t = conv_template_from_config(conv, MISTRAL)
    assert isinstance(t, ConvTemplate)
    assert t.render([{"role": "user", "content": "Hi"}]) == (
        "<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi [/INST] "
    )
    assert list(t.stop_token_ids) == [2] and list(t.stop_strings) == ["[INST]"]


def test_function_string_placeholder() -> None:
    conv = {"name": "f", "system_template": "Tools: {function_string}\n", "roles":
            {"user": "U:", "assistant": "A:"}, "seps": ["\n"]}  # fmt: skip
    t = conv_template_from_config(conv, QWEN)
    tools = [{"name": "f"}]
    assert (
        t.render([{"role": "user", "content": "x"}], tools=tools)
        == 'Tools: [{"name": "f"}]\nU:x\nA:'
    )
    assert t.render([{"role": "user", "content": "x"}]) == "Tools: \nU:x\nA:"


# -- HF jinja templates -------------------------------------------------------------------------

SPECIALS = {"bos_token": "", "eos_token": "<|im_end|>"}


def test_hf_demo_template_with_tools() -> None:
    t = HFChatTemplate({"default": CHAT_TEMPLATE}, special_tokens=SPECIALS, stop_token_ids=[2])
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in <Paris>?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "w", "arguments": '{"c": "P"}'}},
            {"id": "2", "type": "function", "function": {"name": "t", "arguments": "{}"}}]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "noon"},
    ]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "w", "description": "<b>"}}]
    out = t.render(messages, tools=tools)
    assert out.startswith("<|im_start|>system\nUse tools.\n\n# Tools\n")
    # tojson does not HTML-escape (jinja's own does)
    assert '{"type": "function", "function": {"name": "w", "description": "<b>"}}' in out
    assert out.endswith(
        "<|im_start|>user\nWeather in <Paris>?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "w", "arguments": {"c": "P"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "t", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n"
        "<tool_response>\nnoon\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert t.render(messages[1:2], add_generation_prompt=False) == (
        "<|im_start|>user\nWeather in <Paris>?<|im_end|>\n"
    )
    assert list(t.stop_token_ids) == [2]


def test_hf_template_errors_become_invalid_request() -> None:
    t = HFChatTemplate({"default": CHAT_TEMPLATE}, special_tokens=SPECIALS)
    with pytest.raises(InvalidRequestError, match="System messages must come first"):
        t.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(InvalidRequestError, match="Unknown message role"):
        t.render([{"role": "robot", "content": "a"}])


def test_hf_template_sandbox_and_globals() -> None:
    mutate = HFChatTemplate({"default": "{% set _ = messages.append(1) %}{{ messages }}"})
    with pytest.raises(InvalidRequestError):
        mutate.render([{"role": "user", "content": "x"}])
    escape = HFChatTemplate({"default": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})
    with pytest.raises(InvalidRequestError):
        escape.render([])
    helpers = HFChatTemplate(
        {"default": "{{ bos_token }}{{ strftime_now('%Y') | length }}{{ messages[0].content }}"},
        special_tokens={"bos_token": "<s>"},
    )
    assert (
        helpers.render([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == "<s>4hi"
    )
    with pytest.raises(ModelLoadError, match="does not compile"):
        HFChatTemplate({"default": "{% if %}"})


def test_named_templates_pick_tool_use() -> None:
    t = HFChatTemplate({"default": "plain", "tool_use": "{{ tools | length }} tools"})
    assert t.render([]) == "plain"
    assert t.render([], tools=[{"name": "a"}, {"name": "b"}]) == "2 tools"


# -- load_chat_template -------------------------------------------------------------------------


def test_load_prefers_hf_template(tmp_path: Path) -> None:
    config = {"chat_template": "{{ bos_token }}X", "bos_token": {"content": "<s>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "mlc-chat-config.json").write_text(json.dumps({"conv_template": "llama-3"}))
    t = load_chat_template(tmp_path, MISTRAL)
    assert isinstance(t, HFChatTemplate)
    assert t.render([]) == "<s>X" and list(t.stop_token_ids) == [2]


def test_load_named_list_and_jinja_file(tmp_path: Path) -> None:
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ]
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = load_chat_template(tmp_path, QWEN)
    assert t.render([]) == "D" and t.render([], tools=[{}]) == "T"
    other = tmp_path / "other"
    other.mkdir()
    (other / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert load_chat_template(other, QWEN).render([{"role": "user", "content": ""}]) == "J1"


def test_load_conv_template_then_chatml(tmp_path: Path) -> None:
    (tmp_path / "mlc-chat-config.json").write_text(json.dumps({"conv_template": "llama-3"}))
    t = load_chat_template(tmp_path, LLAMA3)
    assert isinstance(t, ConvTemplate) and t.name == "llama-3"
    empty = tmp_path / "empty"
    empty.mkdir()
    fallback = load_chat_template(empty, QWEN)
    assert isinstance(fallback, ConvTemplate) and fallback.name == "chatml"


# -- templates that know nothing of tools (SmolLM2's chatml) --------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}, "strict": None}}  # fmt: skip
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18C"},
]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> HFChatTemplate:
    source = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()
    return HFChatTemplate({"default": source}, special_tokens=SPECIALS, stop_token_ids=[2])


def test_probes_tell_what_a_template_renders(smollm2: HFChatTemplate) -> None:
    assert smollm2.caps() == TemplateCaps(
        renders_tools=False, renders_tool_calls=False, renders_tool_responses=True
    )
    assert smollm2.call_format == "hermes"
    demo = HFChatTemplate({"default": CHAT_TEMPLATE}, special_tokens=SPECIALS)
    assert demo.caps() == TemplateCaps()


def test_smollm2_renders_tool_history_with_null_content(smollm2: HFChatTemplate) -> None:
    assert smollm2.render(HISTORY) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n18C<|im_end|>\n<|im_start|>assistant\n"
    )
    # content next to the calls stays, before them
    said = [{**HISTORY[1], "content": "Checking."}]
    assert "<|im_start|>assistant\nChecking.\n<tool_call>\n" in smollm2.render(said)


def test_smollm2_gets_the_tools_in_a_system_message(smollm2: HFChatTemplate) -> None:
    plain = smollm2.render(HISTORY[:1])
    assert "named SmolLM" in plain and "get_weather" not in plain
    out = smollm2.render(HISTORY[:1], tools=[TOOL])
    assert out.startswith(
        "<|im_start|>system\nYou can call any of the following tools to satisfy the user's "
        'requests: [\n  {\n    "type": "function",\n    "function": {\n      "name": "get_weather",'
    )
    assert "strict" not in out  # null fields of the parsed request are not shown
    assert out.endswith(
        "To call a tool, reply with exactly this syntax (one call per tool):\n\n<tool_call>\n"
        '{"name": "tool_name", "arguments": {"arg1": "some_value"}}\n</tool_call>\n\n'
        "Otherwise, answer the user directly.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = smollm2.render([{"role": "system", "content": "Be brief."}, *HISTORY[:1]],
                                 tools=[TOOL])  # fmt: skip
    assert with_system.startswith("<|im_start|>system\nBe brief.\n\nYou can call any of")
    assert with_system.count("<|im_start|>system") == 1


def test_tool_results_become_user_turns_where_the_template_rejects_them() -> None:
    strict = HFChatTemplate({"default": (
        "{% for m in messages %}{% if m.role not in ['user', 'assistant', 'system'] %}"
        "{{ raise_exception('roles: user/assistant') }}{% endif %}"
        "[{{ m.role }}]{{ m.content }}{% endfor %}"
    )})  # fmt: skip
    assert strict.caps().renders_tool_responses is False
    assert strict.render(HISTORY, add_generation_prompt=False) == (
        "[user]Weather in Paris?"
        '[assistant]<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>[user]<tool_response>\n18C\n</tool_response>"
    )


def test_reasoning_effort_reaches_the_template() -> None:
    """OpenAI's reasoning_effort is a template variable (gpt-oss-style templates read it);
    chat_template_kwargs may set it too, and then win."""
    from mlctrio.protocol.openai import parse_chat_request

    template = HFChatTemplate(
        {"default": "effort={{ reasoning_effort | default('unset') }} "
                    "thinking={{ enable_thinking | default('unset') }}"}
    )  # fmt: skip
    message = [{"role": "user", "content": "hi"}]

    def rendered(**fields: Any) -> str:
        req = parse_chat_request({"model": "m", "messages": message, **fields})
        return template.render(message, template_kwargs=req.template_kwargs())

    assert rendered() == "effort=unset thinking=unset"
    assert rendered(reasoning_effort="high") == "effort=high thinking=unset"
    both = rendered(
        reasoning_effort="high",
        chat_template_kwargs={"reasoning_effort": "low", "enable_thinking": False},
    )
    assert both == "effort=low thinking=False"
