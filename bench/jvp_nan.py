"""Why forward-mode influence (jvp) returned NaN on the GPU for the 0.6B shape (issue 21): the same directional
derivative under variants of the shape and of the attention, each against a central finite difference, and, for a
variant that fails, the first module whose output or tangent stops being finite.

Variants on a mid-sized Llama with random weights (fp32, TF32 off), starting from the 0.6B shape's traits (tied head,
grouped-query attention, heads × head_dim ≠ hidden) and removing one at a time; then the 0.6B shape itself.

    python bench/jvp_nan.py --device cpu --scale tiny        # check the script anywhere (~20 s)
    python bench/jvp_nan.py --device cuda --json bench/results/jvp-nan.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).parent))
from gpu import SHAPES, Shape, make_model, synthetic_rows, word_tokenizer  # noqa: E402

from prefsift.engine import influence as inf  # noqa: E402
from prefsift.engine.forward import packed_batch  # noqa: E402
from prefsift.engine.tokenize import pad_id  # noqa: E402


def variants(scale: str) -> dict[str, tuple[Shape, str]]:
    """name -> (shape, attention implementation)."""
    if scale == "tiny":
        base = Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=128, vocab=1000, tied=True)
    else:  # the 0.6B shape's widths at 4 layers and a 32k vocabulary: minutes become seconds
        base = Shape(hidden=1024, layers=4, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=32000,
                     tied=True)
    out = {"like 0.6B (tied, GQA, heads*dim != hidden), sdpa": (base, "sdpa"),
           "like 0.6B, eager": (base, "eager"),
           "untied head": (Shape(**{**base.__dict__, "tied": False}), "sdpa"),
           "no GQA (kv heads = heads)": (Shape(**{**base.__dict__, "kv_heads": base.heads}), "sdpa"),
           "heads*dim = hidden": (Shape(**{**base.__dict__, "head_dim": base.hidden // base.heads}), "sdpa"),
           "full vocabulary 151,936": (Shape(**{**base.__dict__, "vocab": 151936}), "sdpa")}
    if scale != "tiny":
        out["0.6B shape itself"] = (SHAPES["0.6b"], "sdpa")
    return out


def first_non_finite(model, batch, names, primals, tangents) -> str | None:
    """The first module (in call order) whose output primal or tangent holds a NaN/inf, under one dual forward."""
    seen: list[str] = []
    hooks = []

    def hook(name):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, torch.Tensor) or seen:
                return
            primal, tangent = fwAD.unpack_dual(out)
            if not torch.isfinite(primal).all():
                seen.append(f"{name} (primal)")
            elif tangent is not None and not torch.isfinite(tangent).all():
                seen.append(f"{name} (tangent)")
        return record

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with fwAD.dual_level(), torch.no_grad():
            duals = {n: fwAD.make_dual(p, t) for n, p, t in zip(names, primals, tangents, strict=True)}
            sums = torch.func.functional_call(inf._Packed(model), {f"base.{n}": d for n, d in duals.items()},
                                              (batch,), strict=False)
            _, tangent = fwAD.unpack_dual(sums)
            if not seen and tangent is not None and not torch.isfinite(tangent).all():
                seen.append("log-prob sums (tangent)")
    finally:
        for h in hooks:
            h.remove()
    return seen[0] if seen else None


def unit_direction(params: dict, seed: int = 1) -> dict:
    """A random direction of norm 1 over `params` (not ḡ_val: whether a failure is the direction's or the model's)."""
    torch.manual_seed(seed)
    unit = {n: torch.randn_like(p) for n, p in params.items()}
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in unit.values())))
    return {n: t / norm for n, t in unit.items()}


def run_variant(label: str, shape: Shape, attention: str, device: str, n_pairs: int, max_length: int) -> dict:
    from datasets import Dataset

    model = make_model(shape, torch.float32, device)
    model.config._attn_implementation = attention
    tokenizer = word_tokenizer(shape.vocab)
    rows = synthetic_rows("transcripts", n_pairs + 4, max_length, shape.vocab, seed=3)
    train, val = Dataset.from_list(rows[:n_pairs]), Dataset.from_list(rows[n_pairs:])
    params = inf.scope_parameters(model, "all")
    val_ref = np.zeros((len(val), 2))  # the reference only weights ḡ_val's pairs: any finite values serve
    start = time.perf_counter()
    direction, _ = inf.validation_gradient(model, tokenizer, val, val_ref, params, beta=0.1, max_length=max_length)
    grad_finite = all(bool(torch.isfinite(t).all()) for t in direction.values())
    jvp = inf.forward_ad(model, tokenizer, train, direction, params, max_length=max_length)
    fd = inf.finite_difference(model, tokenizer, train, direction, params, max_length=max_length)
    # a random unit direction too: is the failure ḡ_val's (its scale) or the model's?
    unit = unit_direction(params)
    jvp_unit = inf.forward_ad(model, tokenizer, train, unit, params, max_length=max_length)
    record = {"variant": label, "shape": shape.__dict__, "attention": attention, "pairs": n_pairs,
              "grad_finite": grad_finite, "jvp_nan": int(np.isnan(jvp).sum()), "fd_nan": int(np.isnan(fd).sum()),
              "jvp_unit_direction_nan": int(np.isnan(jvp_unit).sum()), "seconds": time.perf_counter() - start}
    ok = np.isfinite(jvp) & np.isfinite(fd)
    if ok.sum() > 2:
        ranks = [np.argsort(np.argsort(x[ok])) for x in (jvp, fd)]
        record["spearman_jvp_fd"] = float(np.corrcoef(*ranks)[0, 1])
        record["max_rel_err_jvp_fd"] = float(np.abs(jvp[ok] - fd[ok]).max() / np.abs(fd[ok]).max())
    if record["jvp_nan"] or record["jvp_unit_direction_nan"]:
        tokenized = [t for t in inf._tokenize(tokenizer, train, max_length) if t is not None][:2]
        batch = packed_batch(model, tokenized, pad_id(tokenizer))
        names = list(params)
        with inf.eager_attention(model):
            record["first_non_finite"] = first_non_finite(model, batch, names, [params[n].detach() for n in names],
                                                          [direction[n] for n in names])
    print(json.dumps(record), flush=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=("tiny", "mid"), default="mid")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", default=None, help="Run the variants whose name contains this text.")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "rows": []}
    import transformers

    out["transformers"] = transformers.__version__
    for label, (shape, attention) in variants(args.scale).items():
        if args.only and args.only not in label:
            continue
        try:
            out["rows"].append(run_variant(label, shape, attention, args.device, args.pairs, args.max_length))
        except Exception as error:  # noqa: BLE001 - a variant that cannot run is a finding too
            out["rows"].append({"variant": label, "error": f"{type(error).__name__}: {str(error)[:300]}"})
            print(json.dumps(out["rows"][-1]), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
