"""Where, inside attention, forward-mode AD stops being finite on the 0.6B shape (bench/jvp_nan.py found: the first
non-finite tangent comes out of layer 14's attention, the projections before it finite): each layer's largest
primal and tangent of the scores, the masked scores, the probabilities and the output, under prefsift's packed mask
(finfo.min where masked) and under a mask of -1e9; then how many of the pairs' tangents are finite under each mask.

    python bench/jvp_probe.py --device cpu --shape tiny
    python bench/jvp_probe.py --device cuda --shape 0.6b --json bench/results/jvp-probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
import transformers.models.llama.modeling_llama as llama  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).parent))
from gpu import SHAPES, make_model, synthetic_rows, word_tokenizer  # noqa: E402
from jvp_nan import unit_direction  # noqa: E402

from prefsift.engine import influence as inf  # noqa: E402
from prefsift.engine.forward import packed_batch  # noqa: E402
from prefsift.engine.tokenize import pad_id  # noqa: E402

STATS: list[dict] = []


def _stat(layer: int, stage: str, x: torch.Tensor) -> None:
    primal, tangent = fwAD.unpack_dual(x)
    row = {"layer": layer, "stage": stage}
    for name, t in (("primal", primal), ("tangent", tangent)):
        if t is None:
            continue
        finite = torch.isfinite(t)
        row[f"{name}_finite"] = bool(finite.all())
        row[f"{name}_absmax"] = float(t[finite].abs().max()) if finite.any() else None
        row[f"{name}_nonfinite"] = int((~finite).sum())
    STATS.append(row)


def probed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention, each intermediate recorded."""
    layer = module.layer_idx
    key_states = llama.repeat_kv(key, module.num_key_value_groups)
    value_states = llama.repeat_kv(value, module.num_key_value_groups)
    _stat(layer, "query", query)
    _stat(layer, "key", key_states)
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    _stat(layer, "scores", scores)
    if attention_mask is not None:
        scores = scores + attention_mask
    _stat(layer, "masked scores", scores)
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    _stat(layer, "probs", probs)
    out = torch.matmul(probs, value_states)
    _stat(layer, "output", out)
    return out.transpose(1, 2).contiguous(), probs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="0.6b", choices=sorted(SHAPES))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shape = SHAPES[args.shape]
    model = make_model(shape, torch.float32, args.device)
    model.config._attn_implementation = "eager"
    tokenizer = word_tokenizer(shape.vocab)
    from datasets import Dataset

    rows = synthetic_rows("transcripts", args.pairs, args.max_length, shape.vocab, seed=3)
    tokenized = [t for t in inf._tokenize(tokenizer, Dataset.from_list(rows), args.max_length) if t is not None]
    params = inf.scope_parameters(model, "all")
    names = list(params)
    unit = unit_direction(params)
    tangents = [unit[n] for n in names]
    primals = [params[n].detach() for n in names]
    out: dict = {"device": args.device, "shape": args.shape, "torch": torch.__version__, "runs": {}}
    llama.eager_attention_forward = probed_attention
    module = inf._Packed(model)
    for label, masked in (("finfo.min", None), ("-1e9", -1e9), ("-1e4", -1e4)):
        batch = packed_batch(model, tokenized, pad_id(tokenizer))
        if masked is not None:
            mask = batch.inputs["attention_mask"]
            batch.inputs["attention_mask"] = torch.where(mask < 0, torch.full_like(mask, masked), mask)
        STATS.clear()
        with fwAD.dual_level(), torch.no_grad():
            duals = {f"base.{n}": fwAD.make_dual(p, t) for n, p, t in zip(names, primals, tangents, strict=True)}
            sums = torch.func.functional_call(module, duals, (batch,), strict=False)
            primal, tangent = fwAD.unpack_dual(sums)
        first_bad = next((s for s in STATS if not s.get("tangent_finite", True) or not s.get("primal_finite", True)),
                         None)
        run = {"primal_finite": bool(torch.isfinite(primal).all()),
               "tangent_finite_pairs": int(torch.isfinite(tangent).all(dim=1).sum()), "pairs": len(tokenized),
               "tangent": tangent.tolist(), "first_bad": first_bad,
               "layers": [s for s in STATS if s["layer"] in (0, 7, 12, 13, 14, 15, 27)]}
        out["runs"][label] = run
        print(label, json.dumps({k: v for k, v in run.items() if k != "layers"}), flush=True)
        for s in run["layers"]:
            if s["stage"] in ("scores", "masked scores", "probs", "output"):
                print("   ", json.dumps(s), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
