"""The embedded default model: a tiny Qwen2 with a byte-level BPE tokenizer, built offline.

Everything here is deterministic: two builds (any folder, any machine with the same library
versions) produce identical bytes for every file. Weights come from numpy's PCG64 generator
(stable across numpy versions and platforms), drawn per parameter in sorted name order; nothing
relies on torch's initializers. The tokenizer is trained with the `tokenizers` library on the
prose corpus shipped next to this module plus the Zen of Python (decoded from the stdlib `this`
module, identical on every Python 3).

Usage::

    python -m wsync.models.tiny DEST        # build into DEST
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL_NAME = "wsync-tiny"
#: Names that resolve to the embedded model.
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL_NAME, "default"})
#: Folder name under ``<cache_dir>/models``; bump the suffix whenever the build output changes.
DEFAULT_MODEL_DIRNAME = "wsync-tiny-qwen2-v1"

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|endoftext|>"
#: Qwen2's pre-tokenization regex (as in transformers' Qwen2 tokenizer).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
)

# Architecture.
HIDDEN_SIZE = 256
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 64: GPU attention kernels support it
INTERMEDIATE_SIZE = 768
NUM_LAYERS = 4
VOCAB_SIZE = 8192
MAX_POSITIONS = 1024
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-6

# Weight scales (standard deviations). The embedding dominates the residual stream only mildly, so
# attention and MLP blocks mix context into the last position and greedy next tokens depend on the
# whole prompt, not just its last token.
EMBED_STD = 1.0 / HIDDEN_SIZE**0.5  # 0.0625
PROJ_GAIN = 1.0  # linear weights: PROJ_GAIN / sqrt(fan_in)
BIAS_STD = 0.1
#: Embedding rows past the tokenizer's vocabulary (padding rows) are scaled down so greedy decoding
#: never picks an id the tokenizer cannot decode.
UNUSED_ROW_SCALE = 0.01

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def zen_of_python() -> str:
    """The Zen of Python, decoded from the stdlib `this` module without printing it."""
    if "this" in sys.modules:
        this = sys.modules["this"]
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            import this  # noqa: F401  (prints the Zen on first import)
    return "".join(this.d.get(c, c) for c in this.s)


def training_texts() -> list[str]:
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    lines = [line for line in corpus.splitlines() if line.strip()]
    lines += [line for line in zen_of_python().splitlines() if line.strip()]
    return lines


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train the byte-level BPE tokenizer (a `tokenizers.Tokenizer`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Qwen2's exact pipeline (NFC, Qwen split regex, ByteLevel without its own regex): transformers 5
    # rebuilds this pipeline for Qwen2 models from vocab + merges, transformers 4 / vLLM read it from
    # tokenizer.json; both must tokenize identically.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:  # the trainer puts special tokens first
            raise RuntimeError(f"special token {t!r} has id {tok.token_to_id(t)}, expected {i}")
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} exceeds {vocab_size}")
    return tok


def _tokenizer_config(model_max_length: int = MAX_POSITIONS) -> dict[str, Any]:
    return {
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": EOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }


# --------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------


def _model_config(eos_id: int) -> dict[str, Any]:
    """config.json, written by hand so it does not depend on the transformers version.

    It carries both the transformers-4 (`rope_theta`, `torch_dtype`) and transformers-5
    (`rope_parameters`, `dtype`) spellings so vLLM and transformers of either line load it.
    """
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": eos_id,
        "dtype": "bfloat16",
        "eos_token_id": eos_id,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE_SIZE,
        "layer_types": ["full_attention"] * NUM_LAYERS,
        "max_position_embeddings": MAX_POSITIONS,
        "max_window_layers": NUM_LAYERS,
        "model_type": "qwen2",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_theta": ROPE_THETA, "rope_type": "default"},
        "rope_scaling": None,
        "rope_theta": ROPE_THETA,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB_SIZE,
    }


def _generation_config(eos_id: int) -> dict[str, Any]:
    return {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Every stored parameter of the Qwen2ForCausalLM (tied: no `lm_head.weight`)."""
    h, q, kv, ff = HIDDEN_SIZE, NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, INTERMEDIATE_SIZE
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB_SIZE, h),
        "model.norm.weight": (h,),
    }
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (ff, h),
                p + "mlp.up_proj.weight": (ff, h),
                p + "mlp.down_proj.weight": (h, ff),
            }
        )
    return shapes


def generate_weights(seed: int = 0, used_rows: int | None = None) -> dict[str, torch.Tensor]:  # noqa: F821
    """bf16 weights drawn from ``np.random.default_rng(seed)`` in sorted parameter-name order.

    ``used_rows``: the tokenizer's vocabulary size; embedding rows from there on are scaled by
    ``UNUSED_ROW_SCALE``.
    """
    import torch

    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in sorted(param_shapes().items()):
        if name.endswith("norm.weight"):
            arr = np.ones(shape, dtype=np.float32)
        else:
            if name == "model.embed_tokens.weight":
                std = EMBED_STD
            elif name.endswith(".bias"):
                std = BIAS_STD
            else:
                std = PROJ_GAIN / float(np.sqrt(shape[1]))
            arr = rng.standard_normal(shape, dtype=np.float32)
            arr *= np.float32(std)
            if name == "model.embed_tokens.weight" and used_rows is not None:
                arr[used_rows:] *= np.float32(UNUSED_ROW_SCALE)
        out[name] = torch.from_numpy(arr).to(torch.bfloat16).contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_model(dest: Path, seed: int = 0) -> Path:
    """Build the tiny model into ``dest`` (created if missing; files overwritten). Returns ``dest``."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer()
    eos_id = tok.token_to_id(EOS_TOKEN)
    # Canonical, stable JSON: sort keys (the vocab stays ordered by id inside the BPE model).
    tok_json = json.loads(tok.to_str())
    _write_json(dest / "tokenizer.json", tok_json)
    _write_json(dest / "tokenizer_config.json", _tokenizer_config())
    _write_json(dest / "special_tokens_map.json", _special_tokens_map())
    _write_json(dest / "config.json", _model_config(eos_id))
    _write_json(dest / "generation_config.json", _generation_config(eos_id))

    weights = generate_weights(seed, used_rows=tok.get_vocab_size())
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(dest / "model.safetensors", 0o644)  # safetensors creates it 0600
    return dest


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _FILES)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (flock on POSIX; a spin on O_EXCL elsewhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        fcntl = None
    if fcntl is not None:
        with open(path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return
    import time  # pragma: no cover

    excl = path.with_suffix(path.suffix + ".excl")  # pragma: no cover
    while True:  # pragma: no cover
        try:
            fd = os.open(excl, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            time.sleep(0.05)
    try:  # pragma: no cover
        yield
    finally:  # pragma: no cover
        os.close(fd)
        os.unlink(excl)


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Build the default model into ``<cache_dir>/models/wsync-tiny-qwen2-v1`` once; return that path.

    Safe under concurrency: builds into a temporary sibling folder and renames it into place while
    holding a file lock, so readers only ever see a complete folder.
    """
    if cache_dir is None:
        from wsync.settings import default_cache_dir

        cache_dir = default_cache_dir()
    models_dir = Path(cache_dir).expanduser().absolute() / "models"
    final = models_dir / DEFAULT_MODEL_DIRNAME
    if _is_complete(final):
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / f".{DEFAULT_MODEL_DIRNAME}.lock"):
        if _is_complete(final):
            return final
        if final.exists():  # left incomplete by something else: replace it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-", dir=models_dir))
        try:
            build_tiny_model(tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsync.models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to build the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_model(args.dest, seed=args.seed)
    print(out.absolute())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
