"""Chat templates, checked against what transformers' apply_chat_template renders for the same conversations
(expected strings produced with transformers 5.24's render_jinja_template)."""

from __future__ import annotations

import datetime

import numpy as np
import pytest

from imp_jax import registry
from imp_jax.gguf import open_gguf
from imp_jax.text.chat import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError, render_chat
from imp_jax.text.tokenizer import Tokenizer

SMOLLM2_TEMPLATE = (  # tokenizer.chat_template of SmolLM2-135M-Instruct
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501  (tokenizer.chat_template of Qwen2.5-Coder-0.5B-Instruct, verbatim)

GEMMA_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""  # noqa: E501  (Gemma 3's template, abridged: no image content parts)

HARMONY_LIKE_TEMPLATE = r"""{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
    {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
<|start|>system<|message|>Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}
{% if tools %}

# Tools
{{ tools | tojson(indent=2) }}
{% endif %}
<|end|>
{%- for m in messages -%}
    {%- if m.role == 'system' -%}{%- continue -%}{%- endif -%}
    {%- if loop.index0 > ns.last_user -%}{%- break -%}{%- endif -%}
    <|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["°C", "°F"]}},
                "required": ["city"],
            },
        },
    }
]


def test_smollm2_chatml():
    prompt = render_chat(SMOLLM2_TEMPLATE, [{"role": "user", "content": "What is 2+2?"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert render_chat(SMOLLM2_TEMPLATE, conversation, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    )


def test_qwen25_default_system_prompt():
    assert render_chat(QWEN25_TEMPLATE, [{"role": "user", "content": "Write hello world in Python."}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWrite hello world in Python.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen25_tools_and_tool_calls():
    conversation = [
        {"role": "system", "content": "You are a bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}
            ],
        },
        {"role": "tool", "content": "22"},
        {"role": "tool", "content": "sunny"},
    ]
    assert render_chat(QWEN25_TEMPLATE, conversation, tools=TOOLS) == (
        "<|im_start|>system\nYou are a bot.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", '
        '"enum": ["°C", "°F"]}}, "required": ["city"]}}}\n</tools>\n\nFor each function call, return a json object '
        "with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n22\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_gemma_turns_bos_and_trim():
    conversation = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "Capital?"},
    ]
    assert render_chat(GEMMA_TEMPLATE, conversation, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nAnswer in French.\n\nHi<end_of_turn>\n<start_of_turn>model\nBonjour !"
        "<end_of_turn>\n<start_of_turn>user\nCapital?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_raise_exception_becomes_chat_template_error():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(GEMMA_TEMPLATE, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_harmony_like_dates_namespaces_loop_controls_and_tojson_indent():
    conversation = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Tools?"},
        {"role": "assistant", "content": "ignored"},
    ]
    tools_json = (
        '[\n  {\n    "type": "function",\n    "function": {\n      "name": "get_weather",\n      "description": '
        '"Current weather in a city",\n      "parameters": {\n        "type": "object",\n        "properties": {\n'
        '          "city": {\n            "type": "string"\n          },\n          "unit": {\n            "type": '
        '"string",\n            "enum": [\n              "°C",\n              "°F"\n            ]\n          }\n'
        '        },\n        "required": [\n          "city"\n        ]\n      }\n    }\n  }\n]'
    )
    before = datetime.datetime.now().strftime("%Y-%m-%d")
    prompt = render_chat(HARMONY_LIKE_TEMPLATE, conversation, tools=TOOLS)
    after = datetime.datetime.now().strftime("%Y-%m-%d")
    expected = (
        "<|start|>system<|message|>Knowledge cutoff: 2024-06\nCurrent date: {date}\n\n# Tools\n"
        + tools_json
        + "\n<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant<|message|>Hello<|end|>"
        "<|start|>user<|message|>Tools?<|end|><|start|>assistant"
    )
    assert prompt in (expected.replace("{date}", before), expected.replace("{date}", after))


def test_generation_marker_renders_its_body():
    template = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    assert render_chat(template, [{"role": "assistant", "content": "x"}]) == "[x]"


def test_no_template_falls_back_to_chatml_like_llama_cpp():
    chat = ChatTemplate(None)
    assert chat.is_default and chat.source == CHATML_TEMPLATE
    assert chat.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_errors_are_imp_errors_naming_the_problem():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% for m in %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="while rendering"):
        render_chat("{{ messages[0].content.upper(1, 2, 3) }}", [{"role": "user", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="while rendering"):  # the sandbox is immutable
        render_chat("{{ messages.append(1) }}", [{"role": "user", "content": "a"}])
    assert render_chat("{{ messages.__class__ }}", []) == ""  # and hides internals


def tiny_spm_metadata(template: str | None) -> dict:
    tokens = ["<unk>", "<s>", "</s>", "▁", "a"]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.zeros(len(tokens), dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([2, 3, 3, 1, 1], dtype=np.int32),
    }
    if template is not None:
        metadata["tokenizer.chat_template"] = template
    return metadata


def test_from_metadata_binds_bos_and_drops_the_doubled_bos():
    metadata = tiny_spm_metadata("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}")
    tokenizer = Tokenizer.from_metadata(metadata)
    chat = ChatTemplate.from_metadata(metadata, tokenizer)
    assert (chat.bos_token, chat.eos_token) == ("<s>", "</s>")
    prompt = chat.render([{"role": "user", "content": "a"}])
    assert prompt == "a</s>"  # the tokenizer adds <s> itself (add_bos), as llama.cpp's common_chat does
    assert tokenizer.encode(prompt) == [1, tokenizer.piece_to_id("▁"), tokenizer.piece_to_id("a"), 2]
    assert ChatTemplate.from_metadata(tiny_spm_metadata(None), tokenizer).is_default
    tool_use = {**tiny_spm_metadata(None), "tokenizer.chat_template.tool_use": "{{ tools | length }}"}
    assert ChatTemplate.from_metadata(tool_use, tokenizer).render([], tools=[{}, {}]) == "2"  # llama.cpp's 2nd choice


@pytest.mark.slow
@pytest.mark.parametrize(("name", "template"), [("smollm2-135m", SMOLLM2_TEMPLATE), ("qwen2.5-0.5b", QWEN25_TEMPLATE)])
def test_templates_above_are_the_model_files(name, template):
    path = registry.model_path(registry.MODELS[name], registry.cache_root())
    if not path.is_file():
        pytest.skip(f"{name} is not in the model cache ({path})")
    metadata = open_gguf(path).metadata
    assert metadata["tokenizer.chat_template"] == template
    chat = ChatTemplate.from_metadata(metadata, Tokenizer.from_metadata(metadata))
    assert not chat.is_default
    assert chat.render([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")
