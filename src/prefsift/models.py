"""Load a causal LM and its tokenizer from a hub id, a local directory or a `.gguf` file.

Weights load through safetensors (`use_safetensors=True`) and never through pickle; remote code runs only when
the user passes `trust_remote_code=True`. A `.gguf` file is dequantized by transformers into an ordinary
PyTorch model, so it trains as well as it scores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from prefsift.errors import ModelError
from prefsift.output import not_regular


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPU is the field's default; on CPU, bf16 autocast moves log-probs by 0.1-0.5 nats against fp32, so fp32.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise ModelError(f"unknown dtype '{name}' (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    fingerprint: str  # identifies the weights: hub revision, or a content hash of the local weight files


def split_gguf(source: str) -> tuple[str, str | None]:
    path = Path(source)
    if path.suffix == ".gguf":
        _require_regular(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {source}")
        return str(path.parent), path.name
    return source, None


def _require_regular(path: Path) -> None:
    """One line when a model's file (weights, config, tokenizer) exists but is not a regular file: transformers
    would report it missing, or block opening a FIFO."""
    kind = not_regular(path)
    if kind is not None:
        raise ModelError(f"{path} is {kind}, not a regular file: a model's weights, config and tokenizer files must "
                         f"be plain files")


_MODEL_FILE_SUFFIXES = (".safetensors", ".gguf", ".json", ".model", ".txt", ".bin", ".jinja")


def check_model_files(directory: Path) -> None:
    """Every file a local model directory holds for transformers (weights, configs, tokenizer, adapter) is a
    regular file (a directory or FIFO under such a name: one line, before loading)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.suffix in _MODEL_FILE_SUFFIXES:
            _require_regular(entry)


FULL_HASH_LIMIT = 512 * 2**20  # files up to this size are hashed whole; larger ones by header and samples
_SAMPLES, _SAMPLE_BYTES = 64, 2**20
_IDENTITY_FILES = ("config.json", "adapter_config.json")


def _file_digest(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(2**22), b""):
                digest.update(block)
            return
        # A multi-GB file: the safetensors header (names, shapes, offsets) and 64 evenly spaced 1 MiB samples,
        # which any fine-tuning step that touches most tensors changes.
        digest.update(f.read(_SAMPLE_BYTES))
        for k in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * k // (_SAMPLES - 1))
            digest.update(f.read(_SAMPLE_BYTES))


def fingerprint_files(source: str, gguf_file: str | None) -> str:
    """A content hash of a model's weight files and config: a byte-identical copy is the same model, and weights
    rewritten under the same names, sizes and times are not."""
    path = Path(source)
    if not path.exists():
        return f"hub:{source}"
    if gguf_file:
        files = [path / gguf_file]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and (
            p.suffix in (".safetensors", ".gguf") or p.name in _IDENTITY_FILES))
    digest = hashlib.sha256()
    for file in files:
        _file_digest(file, digest)
    return digest.hexdigest()[:16]


def looks_local(source: str) -> bool:
    """A path the user meant as local: hub ids are `name` or `org/name`, never `./x`, `/x`, `~/x` or `x.gguf`."""
    return Path(source).exists() or source.startswith((".", "/", "~")) or source.endswith(".gguf")


def _from_pretrained(source: str, common: dict, auto_class: type = AutoModelForCausalLM) -> PreTrainedModel:
    directory, gguf_file = split_gguf(source)
    # safetensors only: pickled weights from an untrusted file can run code on load.
    extra: dict = {"use_safetensors": True}
    if gguf_file:
        # Dequantize into plain fp32/bf16 Linear layers: left quantized, TRL refuses to fine-tune the model.
        extra = {"gguf_file": gguf_file, "quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}
    if auto_class is AutoModelForCausalLM:
        model, info = auto_class.from_pretrained(directory, **common, **extra, output_loading_info=True,
                                                 ignore_mismatched_sizes=True)
        _check_mismatched(source, info, common)
        return model
    # Any other head (a reward model's score layer) must come from the weights: transformers fills a missing head
    # with random numbers and only logs it, and a random head's outputs would be reported as judgments.
    model, info = auto_class.from_pretrained(directory, **common, **extra, output_loading_info=True,
                                             ignore_mismatched_sizes=True)
    _check_mismatched(source, info, common)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"'{source}' has no {auto_class.__name__.removeprefix('AutoModelFor')} head in its weights "
                         f"(missing {', '.join(missing[:3])}): transformers would give it a random one; give a "
                         f"trained reward model (e.g. TRL's RewardTrainer output), not a causal LM")
    return model


_SPECIAL_IDS = ("pad_token_id", "eos_token_id", "bos_token_id")


def _check_config(source: str, directory: str, common: dict) -> None:
    """One line for a config.json whose special token ids lie outside its own vocabulary (transformers would stop
    with "Padding_idx must be within num_embeddings", or index past the embedding later). A config transformers
    cannot read is left to the load, which says why."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=common.get("trust_remote_code", False))
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:  # noqa: BLE001 - the model's own load reports an unreadable config
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return
    for name in _SPECIAL_IDS:
        value = getattr(text, name, None)
        for token in value if isinstance(value, list | tuple) else [value]:
            if isinstance(token, int) and not 0 <= token < vocab:
                raise ModelError(f"'{source}': its config.json's {name} {token} is outside its vocabulary of {vocab} "
                                 f"tokens (ids 0-{vocab - 1}): a broken config; fix {name}")


def check_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str, *,
                    causal: bool = True) -> None:
    """One line when a tokenizer does not fit its model: token ids past the model's embedding (a vocabulary of
    another model, special tokens added and the embedding never resized), special tokens missing. Without this,
    the first pass stops with an IndexError ("index out of range in self") deep inside the forward."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if isinstance(rows, int):
        # the largest id the tokenizer can give (an added token may sit past len(tokenizer)), not just its length
        size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
        if size > rows:
            raise ModelError(f"'{source}': its tokenizer has {size} tokens but the model embeds {rows} (ids 0-"
                             f"{rows - 1}): the vocabulary does not match the model's embedding (another model's "
                             f"tokenizer, or tokens added without resizing the embeddings)")
        for name in _SPECIAL_IDS:
            token = getattr(tokenizer, name, None)
            if isinstance(token, int) and not 0 <= token < rows:
                raise ModelError(f"'{source}': its tokenizer's {name.removesuffix('_id')} has id {token}, outside the "
                                 f"model's embedding of {rows} tokens: the vocabulary does not match the model")
    if causal and tokenizer.eos_token_id is None:
        raise ModelError(f"'{source}': its tokenizer has no eos token (set eos_token in tokenizer_config.json): "
                         f"every completion ends with it")
    if tokenizer.pad_token_id is None:
        raise ModelError(f"'{source}': its tokenizer has neither a pad token nor an eos token to pad with (set "
                         f"pad_token or eos_token in tokenizer_config.json)")


def _check_mismatched(source: str, info: dict, common: dict) -> None:
    """One line for a tensor whose shape in the weights is not the one the config gives it (loaded with
    ignore_mismatched_sizes, else transformers raises "look at the above report", a report prefsift mutes): a
    classifier of several labels given as a reward model, a config.json whose vocab_size is not the embedding's."""
    for key, in_weights, in_model in sorted(info.get("mismatched_keys") or [], key=str):
        if common.get("num_labels") is not None and tuple(in_model)[:1] == (common["num_labels"],):
            raise ModelError(f"'{source}' has {tuple(in_weights)[0]} score outputs ({key} is "
                             f"{list(in_weights)} in its weights): a reward model must have one score output "
                             f"(num_labels=1, as TRL's RewardTrainer writes), not a {tuple(in_weights)[0]}-label "
                             f"classifier")
        raise ModelError(f"'{source}': {key} is {list(in_weights)} in its weights but {list(in_model)} by its "
                         f"config.json (vocab_size, hidden_size, ...): weights and config do not match")


def _quiet_transformers() -> None:
    """No "Loading weights" bar and no load report: prefsift checks what they say (missing heads) itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers, decided at once (and remembered): offline, transformers would retry for ~30 s
    before failing. HF_HUB_OFFLINE=1 says offline without asking."""
    global _HUB_REACHABLE
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if _HUB_REACHABLE is None:
        answer: list[bool] = []

        def connect() -> None:
            try:
                socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
                answer.append(True)
            except OSError:
                answer.append(False)

        # in a thread: a name lookup that hangs is not covered by the socket's timeout
        import threading

        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(timeout)
        _HUB_REACHABLE = bool(answer and answer[0])
    return _HUB_REACHABLE


_HUB_REACHABLE: bool | None = None


def go_offline_unless_reachable() -> bool:
    """When the hub cannot be reached, switch huggingface_hub to offline mode (cached files still load, at once);
    returns whether we are online."""
    if hub_reachable():
        return True
    import os

    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    return False


def check_device(device: torch.device) -> None:
    """One line before any loading when the device is not there (a typo'd index, CUDA asked on a CPU build)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device} asked for, but torch sees no CUDA GPU here: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"device {device} asked for, but there are {torch.cuda.device_count()} GPUs")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device mps asked for, but torch has no MPS backend here: use --device cpu")


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    directory, gguf_file = split_gguf(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - a truncated tokenizer.json or GGUF: each its own type
        raise ModelError(f"cannot load tokenizer from '{source}': {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as TRL does
    return tokenizer


MAX_ADAPTER_CHAIN = 16  # adapters on adapters: a warm-up, a validation model, an aligned one... never a loop


def _load_weights(source: str, common: dict, auto_class: type, chain: tuple[str, ...]
                  ) -> tuple[PreTrainedModel, str]:
    """The model at `source` and its fingerprint. A directory holding a LoRA adapter (`prefsift train --lora`) is its
    base with the adapter merged in, the base loaded the same way: an adapter trained on a model that was itself an
    adapter names that adapter's directory as its base, so the chain SFT → warm-up → aligned reloads with every
    step. The merged model's `name_or_path` becomes the adapter's directory, which is what peft records as the base
    of an adapter trained on it next. An adapter's fingerprint hashes its own files and its base's fingerprint."""
    directory, gguf_file = split_gguf(source)
    adapter = Path(directory) / "adapter_config.json"
    check_model_files(Path(directory))
    if not adapter.is_file():
        if not gguf_file:
            _check_config(source, directory, common)
        model = _from_pretrained(source, common, auto_class)
        if not Path(directory).exists():  # a hub model: its revision is the fingerprint
            return model, f"hub:{source}@{getattr(model.config, '_commit_hash', None)}"
        # the absolute path: peft records it as the base of an adapter trained on this model, and a relative one is
        # read from whatever directory a later command runs in (another ./sft there would be merged in silently)
        model.name_or_path = str(Path(source).resolve())
        return model, fingerprint_files(directory, gguf_file)
    from peft import PeftModel

    try:
        base_source = json.loads(adapter.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        raise ModelError(f"{adapter} is not a readable adapter config (JSON)") from None
    if not base_source or not isinstance(base_source, str):
        raise ModelError(f"{adapter} names no base model (base_model_name_or_path)")
    if not (Path(directory) / "adapter_model.safetensors").is_file():
        # peft would fall back to adapter_model.bin, a pickle: loading it can run code
        raise ModelError(f"{directory} holds no adapter_model.safetensors: prefsift loads adapter weights "
                         f"from safetensors only (convert a .bin with peft's save_pretrained)")
    here = str(Path(directory).resolve())
    if here in chain or len(chain) >= MAX_ADAPTER_CHAIN:
        raise ModelError(f"{adapter}: its chain of base models loops back or runs past {MAX_ADAPTER_CHAIN} adapters "
                         f"(base_model_name_or_path {base_source})")
    base_path = Path(base_source)  # a directory, or a .gguf file
    if looks_local(base_source) and not base_path.exists():
        raise ModelError(f"the LoRA adapter {directory} sits on {base_source} (base_model_name_or_path in "
                         f"{adapter}), which is not there: restore that model, or edit the path (relative paths "
                         f"are read from the current directory)")
    if not base_path.exists():  # a hub id: offline, at once
        go_offline_unless_reachable()
    base, base_fingerprint = _load_weights(base_source, common, auto_class, (*chain, here))
    model = PeftModel.from_pretrained(base, directory).merge_and_unload()
    model.name_or_path = here  # peft's base of the next adapter: this one (absolute), so the chain keeps every step
    own = fingerprint_files(directory, None)
    return model, hashlib.sha256(f"{own}:{base_fingerprint}".encode()).hexdigest()[:16]


def load_model(
    source: str,
    *,
    dtype: str | None = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    auto_class: type = AutoModelForCausalLM,
    **model_kwargs,
) -> LoadedModel:
    """Load `source` (hub id, local directory, or `.gguf` file) in eval mode, plus its tokenizer: a causal LM, or
    whatever `auto_class` (e.g. AutoModelForSequenceClassification with num_labels=1) builds."""
    source = str(source)
    directory, gguf_file = split_gguf(source)
    if looks_local(source) and not Path(directory).exists():
        raise ModelError(f"model path not found: {source}")
    online = True if Path(directory).exists() else go_offline_unless_reachable()
    torch_device = torch.device(device) if device else default_device()
    check_device(torch_device)
    torch_dtype = parse_dtype(dtype, torch_device)
    if torch_dtype == torch.float16 and torch_device.type == "cpu":
        import warnings

        warnings.warn("float16 on a CPU is slow and loses precision (log-probs move by tenths of a nat): use "
                      "--dtype float32 or bfloat16", stacklevel=2)
    _quiet_transformers()
    common = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
              "attn_implementation": attn_implementation, **model_kwargs}
    try:
        model, fingerprint = _load_weights(source, common, auto_class, ())
        model.to(torch_device).eval()
    except ModelError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - truncated safetensors/GGUF, a bad config: each its own type
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not online:
            reason = f"the hub is unreachable (offline) and it is not in the local cache ({reason[:120]})"
        raise ModelError(f"cannot load model from '{source}' onto {torch_device}: {reason}") from None
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    check_tokenizer(model, tokenizer, source, causal=auto_class is AutoModelForCausalLM)
    return LoadedModel(model, tokenizer, source, fingerprint)


def lora_config(*, r: int = 16, alpha: int = 32, dropout: float = 0.0,
                target_modules: str | list[str] = "all-linear"):
    """The peft LoRA config prefsift uses, for TRL's `peft_config` and for `add_lora`."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM")


def add_lora(model: PreTrainedModel, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
             target_modules: str | list[str] = "all-linear") -> PreTrainedModel:
    """Wrap `model` in a peft LoRA adapter (trainable adapter, frozen base)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules))


def check_finite_weights(loaded: LoadedModel, flag: str, when: str = "") -> None:
    """One line when a model holds NaN or inf weights (a broken file, a bad conversion): said before it is used, as
    the model's fault, rather than as pairs dropped or a training diverged later."""
    import torch

    with torch.no_grad():
        broken = sum(int((~torch.isfinite(p)).sum()) for p in loaded.model.parameters() if p.is_floating_point())
    if broken:
        raise ModelError(f"{loaded.source} ({flag}) has {broken} NaN or inf weights{' ' + when if when else ''}: a "
                         f"broken model; check it, or pass another {flag}")
