"""bonsai.tokenizer vs transformers' AutoTokenizer with the calls diffusers' Flux2KleinPipeline makes, and the
tokenizer folder's error cases."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bonsai import prompt, testing
from bonsai.errors import BonsaiValueError
from bonsai.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

MAX_LENGTH = 96

# A Qwen3-style template with the constructs the released one uses (namespace, reversed loop, string tests and
# methods, tojson, raise_exception, loopcontrols); both sides render it.
RICH_TEMPLATE = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role not in ("user", "system", "assistant") %}{{- raise_exception("unknown role") }}{%- endif %}
    {%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}
    {%- if loop.index0 > 5 %}{%- break %}{%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {{- '<!--' + ({"q": content[:3], "eos": eos_token} | tojson) + '-->' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

FIXED = ["a red fox in snow", "", " ", "\n\n", "\t x \t", "<|im_start|>", "<|im_end|><|endoftext|>", "<think>",
         "</think> ok", "<|im_start |>", "e\u0301 caf\u00e9 \ufb01", "日本語のテキスト", "😀👍🏽 emoji", "don't WE'LL 42",
         "12345678901234567890", "a\u00a0b\u2028c", "\x00\x01", "\ud7ff\ue000", "<<|im_end|>>", "ǅ ß ﬀ"]


def _folder(tmp: Path, template: str | None = None, in_config: bool = False, config: dict | None = None) -> Path:
    testing.write_tokenizer(tmp)
    if template is not None or in_config:
        (tmp / "chat_template.jinja").unlink()
    if template is not None:
        if in_config:
            cfg = json.loads((tmp / "tokenizer_config.json").read_text())
            (tmp / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
        else:
            (tmp / "chat_template.jinja").write_text(template)
    if config:
        cfg = json.loads((tmp / "tokenizer_config.json").read_text())
        (tmp / "tokenizer_config.json").write_text(json.dumps({**cfg, **config}))
    return tmp


def _reference(tok, prompts: list[str], max_length: int = MAX_LENGTH):
    """diffusers' `_get_qwen3_prompt_embeds`: per prompt apply_chat_template then pad/truncate to max_length."""
    ids, masks = [], []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
        enc = tok(text, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
        ids.append(enc["input_ids"])
        masks.append(enc["attention_mask"])
    return torch.cat(ids), torch.cat(masks)


@pytest.fixture(scope="module", params=["jinja-file", "config-entry", "rich-template"])
def pair(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    folder = {"jinja-file": lambda: _folder(tmp), "config-entry": lambda: _folder(tmp, testing.CHAT_TEMPLATE, True),
              "rich-template": lambda: _folder(tmp, RICH_TEMPLATE)}[request.param]()
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


def _check(pair, prompts):
    ours, ref = pair
    for p in prompts:
        m = [{"role": "user", "content": p}]
        kw = dict(tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert prompt.format_prompt(ours, p) == ref.apply_chat_template(m, **kw)
    # prompts the reference would truncate are refused by ours (tested below): compare those that fit
    fits = [p for p in prompts if len(ref(prompt.format_prompt(ref, p))["input_ids"]) <= MAX_LENGTH]
    if fits:
        ids, mask = prompt.tokenize(ours, fits, MAX_LENGTH)
        want_ids, want_mask = _reference(ref, fits)
        assert ids.dtype == mask.dtype == torch.int64
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)


def test_fixed_prompts_match_transformers(pair):
    _check(pair, FIXED)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<|", "|>", " ",
                              "\n", "\t", "a", "é", "\u0301", "1"]), max_size=12).map("".join),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=30)), min_size=1, max_size=4))
def test_generated_prompts_match_transformers(pair, prompts):
    _check(pair, prompts)


def test_overlong_prompt_is_refused_with_its_length(pair):
    ours, ref = pair
    long = "word " * 40
    n = len(ref(prompt.format_prompt(ref, long))["input_ids"])
    ids, mask = prompt.tokenize(ours, ["ok", long], n)
    assert torch.equal(ids, _reference(ref, ["ok", long], n)[0]) and mask[1].all()
    with pytest.raises(BonsaiValueError, match=rf"prompt\[1\] is {n} tokens .* at most {n - 1}"):
        prompt.tokenize(ours, ["ok", long], n - 1)


def test_special_tokens_reach_the_template(tmp_path):
    folder = _folder(tmp_path, "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ messages[0].content }}",
                     config={"eos_token": {"content": "<|im_end|>", "lstrip": False, "special": True}})
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    m = [{"role": "user", "content": "x"}]
    assert ours.apply_chat_template(m) == ref.apply_chat_template(m, tokenize=False) == "|<|im_end|>|<|endoftext|>|x"


def test_template_errors_and_filters_as_transformers(tmp_path):
    folder = _folder(tmp_path, "{{ raise_exception('no ' + messages[0].content) }}")
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    m = [{"role": "user", "content": "x"}]
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="no x"):
        ours.apply_chat_template(m)
    with pytest.raises(jinja2.TemplateError, match="no x"):
        ref.apply_chat_template(m, tokenize=False)
    folder = _folder(tmp_path / "b", "{{ messages | tojson(indent=2) }}{{ strftime_now('%Y') | length }}")
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    m = [{"role": "user", "content": "ü <b>&"}]
    assert ours.apply_chat_template(m) == ref.apply_chat_template(m, tokenize=False)
    assert "ü <b>&" in ours.apply_chat_template(m)  # ensure_ascii=False, no HTML escaping


def test_folder_errors_name_the_file(tmp_path):
    folder = _folder(tmp_path / "none", in_config=True)
    with pytest.raises(BonsaiValueError, match=rf"{folder}: no chat template \(expected chat_template.jinja"):
        load_tokenizer(folder)
    folder = _folder(tmp_path / "left", config={"padding_side": "left"})
    with pytest.raises(BonsaiValueError, match=r"tokenizer_config.json: padding_side must be \"right\".*'left'"):
        load_tokenizer(folder)
    folder = _folder(tmp_path / "nopad", config={"pad_token": None})
    with pytest.raises(BonsaiValueError, match=r"tokenizer_config.json: no pad_token"):
        load_tokenizer(folder)
    folder = _folder(tmp_path / "oov", config={"pad_token": "<pad>"})
    with pytest.raises(BonsaiValueError, match=r"pad_token '<pad>' is not in the vocabulary"):
        load_tokenizer(folder)
    folder = _folder(tmp_path / "badtok", config={"eos_token": 5})
    with pytest.raises(BonsaiValueError, match=r"tokenizer_config.json: eos_token must be a string.* got int"):
        load_tokenizer(folder)
    folder = _folder(tmp_path / "syntax", "{% if %}")
    with pytest.raises(BonsaiValueError, match=r"chat template does not compile"):
        load_tokenizer(folder)
    folder = _folder(tmp_path / "missing")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer file .*tokenizer.json"):
        load_tokenizer(folder)


def test_tokenizer_json_padding_and_truncation_settings_are_ignored(tmp_path):
    """A tokenizer.json may store padding/truncation; transformers overrides them per call, so do we."""
    folder = _folder(tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 7}, "direction": "Left", "pad_to_multiple_of": None, "pad_id": 1,
                       "pad_type_id": 0, "pad_token": "!"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    ours, ref = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    ids, mask = prompt.tokenize(ours, ["a longer prompt"], 40)
    assert torch.equal(ids, _reference(ref, ["a longer prompt"], 40)[0])


def test_shared_across_threads(tmp_path):
    """The serve engine's request checks and its worker share one tokenizer: 16 threads, same ids as alone."""
    tok = load_tokenizer(_folder(tmp_path))
    want = {i: prompt.tokenize(tok, [f"prompt {i} " * (i % 7)], 128)[0] for i in range(16)}
    errors = []

    def work(i):
        for _ in range(20):
            if not torch.equal(prompt.tokenize(tok, [f"prompt {i} " * (i % 7)], 128)[0], want[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("backend", ["torch", "cuda", "mlx"])
def test_render_imports_no_transformers(tmp_path, backend):
    """import bonsai + from_pretrained + one render, in a fresh process: transformers (and its sklearn, ...) never
    loads, nor torch._dynamo / sympy (seconds of a cold start each, pulled in by a random init on meta tensors)."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    layout = "mlx" if backend == "mlx" else "gemlite"
    repo = testing.write_repo(tmp_path / "repo", layout=layout, kind="ternary", seed=1)
    code = (f"import sys, bonsai\n"
            f"pipe = bonsai.Pipeline.from_pretrained({str(repo)!r}, backend={backend!r})\n"
            "image = pipe('a red fox', width=64, height=64, seed=1, progress=False).image\n"
            "assert image.size == (64, 64)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sklearn', 'sympy')\n"
            "             or m.startswith('torch._dynamo')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
