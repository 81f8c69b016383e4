"""The Qwen3 tokenizer without transformers: tokenizer.json through the `tokenizers` library, the chat template
through jinja2 rendered as transformers renders it, right padding to max_length.

Importing this module imports neither torch nor transformers; `load_tokenizer` imports tokenizers and jinja2.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import BonsaiValueError
from .files import _is_file, one_line, read_json

# The named special tokens transformers hands to every chat template (`special_tokens_map`), as strings.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers write the template here; it wins over the config's


class Tokenizer:
    """tokenizer.json + chat template + pad token: the subset of a transformers tokenizer the prompts use.

    Nothing in it changes after construction (padding happens here, not in the `tokenizers` object), so one
    instance is safe to share across threads.
    """

    def __init__(self, backend, chat_template: str, special_tokens: dict[str, str], source: str = "tokenizer"):
        import jinja2.ext
        import jinja2.sandbox

        self.backend = backend  # a tokenizers.Tokenizer without padding or truncation
        self.special_tokens = dict(special_tokens)
        self.source = source
        self.pad_token_id = self._pad_id()
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(chat_template)
        except jinja2.TemplateError as e:
            raise BonsaiValueError(f"{source}: chat template does not compile ({one_line(e)})") from None

    def _pad_id(self) -> int:
        pad = self.special_tokens.get("pad_token")
        if pad is None:
            raise BonsaiValueError(f"{self.source}: no pad_token (the prompts are padded to max_length)")
        pad_id = self.backend.token_to_id(pad)
        if pad_id is None:
            raise BonsaiValueError(f"{self.source}: pad_token {pad!r} is not in the vocabulary")
        return pad_id

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            **kwargs) -> str:
        """The rendered chat, as transformers' `apply_chat_template(..., tokenize=False)`: the special tokens and
        `kwargs` are template variables (kwargs win)."""
        if tokenize:
            raise BonsaiValueError("apply_chat_template: only tokenize=False is supported; call the tokenizer")
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs})

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None) -> dict:
        """-> {"input_ids", "attention_mask"}: lists (a list of lists for a list of texts), special tokens added
        as transformers adds them; padding="max_length" right-pads to max_length (longer texts stay whole)."""
        if truncation or padding not in (False, "max_length") or (padding and max_length is None):
            raise BonsaiValueError(f"tokenizer: unsupported truncation={truncation!r} padding={padding!r} "
                                   f"max_length={max_length!r} (supported: no truncation, padding='max_length')")
        texts = [text] if isinstance(text, str) else list(text)
        ids = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=True)]
        width = max_length if padding else 0
        input_ids = [row + [self.pad_token_id] * (width - len(row)) for row in ids]
        mask = [[1] * len(row) + [0] * (width - len(row)) for row in ids]
        if isinstance(text, str):
            return {"input_ids": input_ids[0], "attention_mask": mask[0]}
        return {"input_ids": input_ids, "attention_mask": mask}


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: jinja2's own escapes HTML characters
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _token_string(value, file: Path, key: str) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, an AddedToken dict {"content": ...} or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise BonsaiValueError(f"{file}: {key} must be a string, null or an object with a \"content\" string, got "
                           f"{type(value).__name__}")


def _chat_template(folder: Path, config: dict) -> str:
    file = folder / CHAT_TEMPLATE_FILE
    if file.is_file():
        try:
            return file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise BonsaiValueError(f"{file} is not UTF-8 text (byte {e.start})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates, as transformers saves several: the prompts use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        raise BonsaiValueError(f"{folder}: no chat template (expected {CHAT_TEMPLATE_FILE} or a \"chat_template\" "
                               "in tokenizer_config.json)")
    if not isinstance(template, str):
        raise BonsaiValueError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string, got "
                               f"{type(template).__name__}")
    return template


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a tokenizer folder (tokenizer.json, tokenizer_config.json, maybe chat_template.jinja);
    errors name the file at fault.

    The special tokens come from tokenizer_config.json (transformers' class defaults and the legacy
    special_tokens_map.json are not read); padding_side must be "right" (the default), as the text encoder's
    positions assume.
    """
    from tokenizers import Tokenizer as Backend

    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    config = read_json(config_file, "tokenizer file")
    file = _is_file(folder / "tokenizer.json", "tokenizer file")
    try:
        backend = Backend.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        read_json(file, "tokenizer file")  # only on failure: a JSON error named as such (the file is large)
        raise BonsaiValueError(f"{file}: not a readable tokenizer ({one_line(e)})") from None
    backend.no_padding()  # settings stored in tokenizer.json; transformers resets them per call as well
    backend.no_truncation()
    side = config.get("padding_side", "right")
    if side != "right":
        raise BonsaiValueError(f"{config_file}: padding_side must be \"right\" (the text encoder's positions "
                               f"assume right padding), got {side!r}")
    special = {k: _token_string(config.get(k), config_file, k) for k in SPECIAL_TOKEN_KEYS}
    return Tokenizer(backend, _chat_template(folder, config), {k: v for k, v in special.items() if v is not None},
                     source=str(config_file))
