"""Chat templates: a model's Jinja template renders exactly as Hugging Face's `apply_chat_template` (the
reference), minus the BOS token the tokenizer adds itself; a template's `raise_exception` is a 400;
without a template, the documented plain-text default and its end-of-turn stop."""

import json

import openai
import pytest
from test_serve_utils import InProcessServer, ascii_tokenizer, encode, tiny_engine

from moekit.serve.chat import DEFAULT_JINJA, DEFAULT_STOP, ChatTemplate, load_chat_template, render_default

# Zephyr-style, with the role check of Llama-2's template (raise_exception on non-alternating roles).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] != 'system' and (m['role'] == 'user') != (loop.index0 % 2 == (1 if messages[0]['role'] "
            "== 'system' else 0)) %}{{ raise_exception('Conversation roles must alternate user/assistant') }}"
            "{% endif %}"
            "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    return tmp_path


def test_jinja_template_renders_as_transformers_does(model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=ascii_tokenizer(), bos_token="<s>", eos_token="</s>")
    hf.chat_template = TEMPLATE
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    template = load_chat_template(model_dir)
    assert template.origin.endswith("tokenizer_config.json") and template.stop == []
    assert expected.startswith("<s>") and template.render(MESSAGES) == expected.removeprefix("<s>")
    with pytest.raises(ValueError, match="roles must alternate"):
        template.render(MESSAGES[:2] + MESSAGES[1:2])


def test_template_sources_in_order(model_dir):
    (model_dir / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_chat_template(model_dir).render(MESSAGES[:2]) == "[Be brief.][Hi]"  # the .jinja file first
    assert load_chat_template(model_dir, "{{ messages | length }}").render(MESSAGES) == "4"  # then the flag
    assert load_chat_template(model_dir, "default").render(MESSAGES[:2]) == render_default(MESSAGES[:2])
    assert load_chat_template(model_dir.parent / "nothing-here").source is None
    assert ChatTemplate().stop == DEFAULT_STOP == ["\n\nUser:"]


def test_the_server_uses_the_template_and_answers_400_when_it_refuses(model_dir):
    with InProcessServer(tiny_engine, template=load_chat_template(model_dir)) as s:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
        assert r.usage.prompt_tokens == len(encode(load_chat_template(model_dir).render(MESSAGES)))
        with pytest.raises(openai.BadRequestError, match="rejected these messages: Conversation roles") as e:
            client.chat.completions.create(model="tiny", messages=MESSAGES[:2] + MESSAGES[1:2])
        assert e.value.param == "messages"


def test_default_template_stops_at_the_next_user_turn():
    text = render_default([{"role": "developer", "content": "x"}, {"role": "user", "content": "y"},
                           {"role": "tool", "content": "z"}])
    assert text == "System: x\n\nUser: y\n\nTool: z\n\nAssistant:"
    with InProcessServer(tiny_engine) as s:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0)
        plain = client.completions.create(model="tiny", prompt="User: a\n\nAssistant:", max_tokens=40, temperature=0)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=40,
                                              temperature=0)
        cut = plain.choices[0].text.split("\n\nUser:")[0]
        assert chat.choices[0].message.content == cut
        assert chat.choices[0].finish_reason == ("stop" if "\n\nUser:" in plain.choices[0].text
                                                 else plain.choices[0].finish_reason)


def test_the_default_template_in_jinja_renders_as_the_default():
    """GET /tokenizer_info hands clients the default template as Jinja: it must render exactly what we render."""
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi {{ x }}\n\nthere"},
         {"role": "assistant", "content": "Hello!"}, {"role": "developer", "content": "be kind"},
         {"role": "tool", "content": "42"}, {"role": "user", "content": "What is 2+2? {% raw %}"}],
    ]
    jinja = ChatTemplate(DEFAULT_JINJA)
    for messages in conversations:
        assert jinja.render(messages) == render_default(messages)
