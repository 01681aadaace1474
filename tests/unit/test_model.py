"""The embedded tiny model: deterministic build, loadable by transformers, non-degenerate greedy outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsync.errors import InvalidInput
from wsync.models import resolve_model, tiny
from wsync.models.tiny import (
    DEFAULT_MODEL_DIRNAME,
    DEFAULT_MODEL_NAME,
    build_tiny_model,
    ensure_default_model,
)
from wsync.patches import reference_patch
from wsync.schemas.common import REFERENCE_PROMPTS

FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture()
def model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def _next_tokens(model, tokenizer, prompts) -> list[int]:
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out.append(int(model(ids).logits[0, -1].argmax()))
    return out


# ---------------------------------------------------------------------------- build


def test_build_writes_the_hf_folder(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == FILES


def test_two_builds_are_byte_identical_across_processes(tiny_dir, tmp_path):
    other = tmp_path / "again"
    # A separate process: different hash seeds, same bytes. Also exercises the module entry point.
    res = subprocess.run(
        [sys.executable, "-m", "wsync.models.tiny", str(other)],
        capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "RuntimeWarning" not in res.stderr
    assert Path(res.stdout.strip()) == other.absolute()
    for name in FILES:
        assert (tiny_dir / name).read_bytes() == (other / name).read_bytes(), name


def test_seed_changes_weights_only(tiny_dir, tmp_path):
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_json_files_are_sorted_and_path_free(tiny_dir):
    for name in FILES:
        if not name.endswith(".json"):
            continue
        text = (tiny_dir / name).read_text(encoding="utf-8")
        obj = json.loads(text)
        assert text == json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        assert str(tiny_dir) not in text
        assert "transformers_version" not in text


def test_weights_layout(tiny_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        assert keys == sorted(tiny.param_shapes())
        assert "lm_head.weight" not in keys  # tied
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.bfloat16
            assert tuple(t.shape) == tiny.param_shapes()[k]
            assert torch.isfinite(t.float()).all()
            if k.endswith("norm.weight"):
                assert torch.equal(t, torch.ones_like(t))
        emb = f.get_tensor("model.embed_tokens.weight").float()
    assert 0.03 < emb[:1000].std().item() < 0.1


def test_corpus_contains_reference_prompts():
    corpus = tiny.CORPUS_PATH.read_text(encoding="utf-8")
    assert 30_000 <= len(corpus.encode("utf-8")) <= 60_000
    for prompt in REFERENCE_PROMPTS:
        assert prompt in corpus


def test_zen_of_python_is_decoded_silently(capsys):
    zen = tiny.zen_of_python()
    assert zen.startswith("The Zen of Python, by Tim Peters")
    assert "Beautiful is better than ugly." in zen
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------- loading


def test_loads_as_tied_bf16_qwen2(model):
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.bfloat16
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert cfg.tie_word_embeddings is True
    assert cfg.hidden_size == 256 and cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert cfg.hidden_size // cfg.num_attention_heads == 64 and getattr(cfg, "head_dim", 64) == 64
    assert cfg.intermediate_size == 768 and cfg.num_hidden_layers == 4
    assert cfg.vocab_size == 8192 and cfg.max_position_embeddings == 1024
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (128, 256)


def test_config_declares_both_transformers_spellings(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 0
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0


def test_tokenizer_loads_and_matches_tokenizer_json(tiny_dir, tokenizer):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    assert len(tokenizer) <= 8192
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert set(tokenizer.all_special_ids) == {0, 1, 2}
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    generic = PreTrainedTokenizerFast(tokenizer_file=str(tiny_dir / "tokenizer.json"))
    texts = list(REFERENCE_PROMPTS) + [
        "  two  spaces\n\nand 12345 digits, don't I'LL",
        "caf\u00e9 vs cafe\u0301, \u65e5\u672c\u8a9e",
        "<|im_start|>user\nhi<|im_end|>",
        tiny.zen_of_python(),
    ]
    for text in texts:
        ids = raw.encode(text).ids
        assert tokenizer(text)["input_ids"] == ids  # no BOS/EOS added
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        assert generic(text)["input_ids"] == ids
    assert tokenizer.decode(tokenizer("Hello, my name is")["input_ids"]) == "Hello, my name is"


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------- greedy outputs


def test_greedy_next_tokens_are_not_degenerate_and_change_after_reference_patch(model, tokenizer):
    prompts = list(REFERENCE_PROMPTS)
    before = _next_tokens(model, tokenizer, prompts)
    assert len(set(before)) > 1, before
    last = [tokenizer(p)["input_ids"][-1] for p in prompts]
    assert before != last  # not just repeating the prompt's last token
    assert all(t < len(tokenizer) and tokenizer.decode([t]) for t in before)  # decodable ids
    reference_patch(model, tokenizer, prompts, rows=32)
    after = _next_tokens(model, tokenizer, prompts)
    assert any(a != b for a, b in zip(before, after)), (before, after)


# ---------------------------------------------------------------------------- resolve / ensure


def test_resolve_model_default_and_aliases(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = resolve_model(None)
    expected = tmp_path / "xdg" / "wsync" / "models" / DEFAULT_MODEL_DIRNAME
    assert Path(path) == expected and Path(path).is_absolute()
    assert all((expected / f).is_file() for f in FILES)
    stamp = (expected / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(DEFAULT_MODEL_NAME) == path
    assert resolve_model("default", cache_dir=tmp_path / "xdg" / "wsync") == path
    assert resolve_model("") == path  # not the current directory
    assert (expected / "model.safetensors").stat().st_mtime_ns == stamp  # built once
    leftovers = [p.name for p in expected.parent.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []


def test_resolve_model_local_folder_and_hub_id(tmp_path, monkeypatch):
    folder = tmp_path / "mymodel"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("mymodel") == str(folder.absolute())
    assert resolve_model(str(folder)) == str(folder.absolute())
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidInput, match="not a model folder"):  # a file is not a model folder
        resolve_model("afile")


def test_ensure_default_model_concurrent_processes(tmp_path, tiny_dir):
    cache = tmp_path / "cache"
    code = "import sys; from wsync.models.tiny import ensure_default_model as e; print(e(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
        for _ in range(3)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip())
    final = cache / "models" / DEFAULT_MODEL_DIRNAME
    assert set(outs) == {str(final)}
    for name in FILES:
        assert (final / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert sorted(p.name for p in final.parent.iterdir() if p.is_dir()) == [DEFAULT_MODEL_DIRNAME]


def test_ensure_default_model_repairs_incomplete_folder(tmp_path):
    final = tmp_path / "models" / DEFAULT_MODEL_DIRNAME
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    assert ensure_default_model(tmp_path) == final
    assert all((final / f).is_file() for f in FILES)
