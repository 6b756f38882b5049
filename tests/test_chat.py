"""--chat: a prompt rendered in a released Instruct model's own chat template (read from its folder, rendered by
transformers' apply_chat_template), then encoded with its special tokens read as themselves; refusals in one
line where there is no template."""
from __future__ import annotations

import json

import pytest

from core.files import UserError
from data.chat import chat_template, render_chat, special_tokens
from data.tokenizer import ModelTokenizer
from experiment.flags import SamplingFlags
from experiment.paths import BASE_MODEL_KEY
from tests.public_tokenizers import BPE_SIZE, LLADA_CHAT, LLADA_SPECIALS, write_bpe_public_folder

LLADA_RENDERED = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")


def released(folder) -> dict:
    return {BASE_MODEL_KEY: {"folder": str(folder), "max_seq_len": 64}}


def test_llada_s_template_renders_as_its_chat_script_would(tmp_path):
    """LLaDA-8B-Instruct's own template: BOS first, the content trimmed, the assistant's header opened."""
    folder = write_bpe_public_folder(tmp_path / "llada", "llada")
    assert chat_template(folder) == LLADA_CHAT
    assert special_tokens(folder)["bos_token"] == "<|startoftext|>"
    text = render_chat(LLADA_CHAT, "  What is 2+2? ", special_tokens(folder))
    assert text == LLADA_RENDERED
    assert SamplingFlags(prompt=["  What is 2+2? "], chat=True).model_prompts(released(folder)) == [text]
    tok = ModelTokenizer.from_model_folder(folder)
    ids, tail = tok.encode_prompt(text), tok.encode("\n\n")
    special = {s: BPE_SIZE + i for i, s in enumerate(LLADA_SPECIALS)}
    assert ids[:2] == [special["<|startoftext|>"], special["<|start_header_id|>"]]  # each a single id
    assert ids[-len(tail) - 1:] == [special["<|end_header_id|>"], *tail] and ids.count(special["<|eot_id|>"]) == 1


def test_dream_s_chatml_template_opens_the_assistant_turn(tmp_path):
    folder = write_bpe_public_folder(tmp_path / "dream", "dream")
    (text,) = SamplingFlags(prompt=["Hi"], chat=True).model_prompts(released(folder))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = ModelTokenizer.from_model_folder(folder).encode_prompt(text)
    assert ids.count(BPE_SIZE + 1) == 3  # <|im_start|> read as itself, three times


def test_templates_in_a_list_or_a_jinja_file_and_none(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages[0].content }}!"}]}))
    assert chat_template(tmp_path) == "{{ messages[0].content }}!"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    assert chat_template(tmp_path) is None and special_tokens(tmp_path) == {"bos_token": "<s>"}
    (tmp_path / "chat_template.jinja").write_text("[{{ messages[0].content }}]")
    assert render_chat(chat_template(tmp_path), "x", {}) == "[x]"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'config' }}"}))
    assert chat_template(tmp_path) == "[{{ messages[0].content }}]"  # the .jinja file first, as transformers
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "rag", "template": "x"}]}))
    with pytest.raises(UserError, match=r"chat templates named \['rag'\] and none named 'default'"):
        chat_template(tmp_path)


def test_chat_is_refused_in_one_line_without_a_template(tmp_path):
    plain = SamplingFlags(prompt=["a b"])
    assert plain.model_prompts({"train": {}}) == ["a b"]  # without --chat the prompt is as typed
    with pytest.raises(UserError, match="^--chat: this run's model was trained here and has no chat template"):
        SamplingFlags(prompt=["a b"], chat=True).model_prompts({"train": {}})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))  # a Base model
    with pytest.raises(UserError, match=f"^--chat: {tmp_path} has no chat template .*a Base model continues"):
        SamplingFlags(prompt=["a b"], chat=True).model_prompts(released(tmp_path))
    with pytest.raises(UserError, match="^the chat template cannot render a prompt") as e:
        render_chat("{{ raise_exception('only system and user roles') }}", "a", {})
    assert "\n" not in str(e.value)


def test_the_rendering_is_the_same_under_transformers_4():
    """Users on transformers 4 (circuit-tracer's pinned 4.57.3, in a subprocess) get the same text."""
    from tests.helpers import side_package_python

    code = ("import json, sys, transformers\nfrom data.chat import render_chat\nfrom tests.public_tokenizers import "
            "LLADA_CHAT\nassert transformers.__version__.startswith('4.'), transformers.__version__\n"
            "print(json.dumps(render_chat(LLADA_CHAT, sys.argv[1], {'bos_token': '<|startoftext|>'})))")
    proc = side_package_python("circuit-tracer", code, "  What is 2+2? ")
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == LLADA_RENDERED


@pytest.mark.parametrize("stage", ["generate", "explain"])
def test_chat_is_refused_before_the_model_is_read(stage, tmp_path, monkeypatch):
    """Stages 2 and 6 render (or refuse) the prompts from the run's config.json alone: an 8B model is not read
    only to be refused."""
    import interp.explanations.stage as explain_stage
    import interp.generation as generation
    from interp.explanations.config import ExplainConfig
    from interp.generation import GenerateConfig

    (tmp_path / "config.json").write_text(json.dumps({"train": {"train_seq_len": 64}, "model": {}}))

    def never(*args, **kwargs):
        raise AssertionError("the model was read before --chat was checked")
    for module in (generation, explain_stage):
        monkeypatch.setattr(module, "load_run", never)
    flags = dict(train_folder=str(tmp_path), device="cpu", prompt=["x"], chat=True)
    with pytest.raises(UserError, match="^--chat: this run's model was trained here"):
        if stage == "generate":
            generation.main(GenerateConfig(**flags))
        else:
            explain_stage.run_explanations(ExplainConfig(explainer="tokens", **flags))
