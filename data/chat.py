"""A released Instruct model's chat template (LLaDA-8B-Instruct, Dream-v0-Instruct-7B): a prompt is rendered
as one user message followed by the assistant's header, as the models' own chat scripts do before encoding.

The template is read from the model's folder as transformers reads it: chat_template.jinja, else
tokenizer_config.json's `chat_template` (a string, or a list of named templates, the one named "default"
taken). It is rendered by transformers' own `apply_chat_template`, with the special tokens (`bos_token`,
`eos_token`, ...) tokenizer_config.json names, so the text is what transformers would give for that folder;
the stages then encode it with `encode_prompt`, which reads the special tokens in it as themselves.
"""
from __future__ import annotations

from pathlib import Path

from core.files import UserError, read_json

CONFIG_FILE = "tokenizer_config.json"
JINJA_FILE = "chat_template.jinja"


def _config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    values = read_json(path) if path.is_file() else {}
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a JSON object")
    return values


def chat_template(folder: str | Path) -> str | None:
    """The chat template of a released model's folder, or None when it has none (a Base model). As transformers
    reads them: chat_template.jinja first, then tokenizer_config.json's `chat_template` (a list of named
    templates: the one named "default"; a list without one is refused in one line)."""
    folder = Path(folder)
    if (folder / JINJA_FILE).is_file():
        return (folder / JINJA_FILE).read_text(encoding="utf-8")
    found = _config(folder).get("chat_template")
    if isinstance(found, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"{folder / CONFIG_FILE} has chat templates named {sorted(map(str, named))} and none "
                            "named 'default': --chat uses the default one")
        found = named["default"]
    return found if isinstance(found, str) and found else None


def special_tokens(folder: str | Path) -> dict[str, str]:
    """tokenizer_config.json's named special tokens (bos_token, eos_token, pad_token, ...) as text: the
    variables a chat template reads."""
    out = {}
    for key, value in _config(Path(folder)).items():
        if key.endswith("_token") and isinstance(value, dict):
            value = value.get("content")
        if key.endswith("_token") and isinstance(value, str):
            out[key] = value
    return out


def render_chat(template: str, prompt: str, tokens: dict[str, str]) -> str:
    """`prompt` as one user message and the assistant's turn opened (add_generation_prompt), rendered with
    transformers' chat templating and the special tokens `tokens` (`special_tokens`)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    holder = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), **tokens)  # only the tokens' names
    try:
        text = holder.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template,
                                          tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2's errors, or the template's own raise_exception
        raise UserError(f"the chat template cannot render a prompt ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    assert isinstance(text, str)
    return text
