"""Speed of learning without forgetting, side by side in one run.

(a) One training step with distillation against a plain cross-entropy step on the same model
    and batch (AdamW, forward + backward + step), median of interleaved repetitions:
    * frozen backbone: the head trains on cached features; the teacher's old logits come
      from the same features (precomputed once with them, as ``learn`` does), so no extra
      forward pass; also shown: the teacher head run on the features every step, and a
      frozen backbone that runs every step (changing inputs) with the old head's logits
      taken from the same features;
    * trainable backbone: the whole model trains; the teacher's logits are cached once when
      the inputs are fixed (``learn``'s default for tensors and feature files), or computed by
      a forward pass of the frozen teacher every step (inputs with random augmentation).
    With cached soft targets ``learn`` fuses cross-entropy and distillation into one autograd
    node for logits of >= 16384 numbers and uses the two ordinary losses for smaller ones.
    Models: the digits MLP 64-128-128-10 (batch 64), an ImageNet-sized head on ResNet-18
    features (512 -> 1000, batch 256) and a torchvision ResNet-18 on 32x32 inputs (batch 32).
    Targets: <= 1.05x frozen, <= 1.35x trainable.
(b) Adding digits 7-9 to the 0-6 MLP through the statistics path (old classes' statistics
    stored with the model; features of the new data only; closed-form head) against
    retraining a linear head on all data, feature extraction included (AdamW mini-batches,
    and full-batch L-BFGS logistic regression), median of repetitions, with all-class test
    accuracy. Target: >= 10x faster at <= 1 point lower accuracy.

    .venv/bin/python benchmarks/speed.py          # both tables (about a minute on 1 core)
    .venv/bin/python benchmarks/speed.py --json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headgraft.data import digits
from headgraft.demo import BASE, NEW, digits_mlp, train_base
from headgraft.evaluate import evaluate
from headgraft.learn import DistillationLoss, learn
from headgraft.learn.losses import SoftTargets, cross_entropy_with_distillation
from headgraft.stats import ClassStats

# ----------------------------------------------------------------------------- (a) steps


def _timeit(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds of each function, repetitions interleaved so load affects all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _loss_variants(
    distill: DistillationLoss,
    y: torch.Tensor,
    soft: SoftTargets,
    teacher: Callable[[], torch.Tensor],
    teacher_name: str,
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Loss of each compared step, from the student's logits."""

    def fused(z: torch.Tensor) -> torch.Tensor:
        ce, kl = cross_entropy_with_distillation(z, y, soft, distill.alpha)
        return ce + kl

    def live(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            t = teacher()
        return F.cross_entropy(z, y) + distill(z, t.clone())

    return {
        "ce": lambda z: F.cross_entropy(z, y),
        "distill: cached soft targets, fused": fused,
        "distill: cached soft targets, two losses": lambda z: (
            F.cross_entropy(z, y) + distill(z, soft=soft)
        ),
        f"distill: {teacher_name}": live,
    }


def _time_steps(
    module: nn.Module, x: torch.Tensor, losses: dict[str, Any], lr: float, reps: int
) -> dict[str, Any]:
    m = copy.deepcopy(module).train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4)

    def step(loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        loss = loss_fn(m(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _ratios(_timeit({k: (lambda f=f: step(f)) for k, f in losses.items()}, reps))


def _frozen_steps(
    head: nn.Module, feats: torch.Tensor, y: torch.Tensor, num_old: int, reps: int
) -> dict[str, Any]:
    """Head-only steps on cached features: CE against CE + distillation."""
    distill = DistillationLoss(num_old, temperature=2.0, alpha=1.0)
    t_head = copy.deepcopy(head).eval().requires_grad_(False)
    with torch.no_grad():
        soft = distill.soft_targets(t_head(feats))  # made once, with the cached features
    losses = _loss_variants(distill, y, soft, lambda: t_head(feats), "teacher head every step")
    return _time_steps(head, feats, losses, 1e-3, reps)


def _frozen_backbone_steps(
    backbone: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, num_old: int,
    reps: int,
) -> dict[str, Any]:
    """Steps whose frozen backbone runs every step (inputs that change, e.g. augmentation):
    the teacher's old logits come from the same features through the frozen old head, so
    distillation adds no backbone forward."""
    distill = DistillationLoss(num_old, temperature=2.0, alpha=1.0)
    backbone = copy.deepcopy(backbone).eval().requires_grad_(False)
    t_head = copy.deepcopy(head).eval().requires_grad_(False)
    h = copy.deepcopy(head).train()
    opt = torch.optim.AdamW(h.parameters(), lr=1e-3, weight_decay=1e-4)

    def step(with_distill: bool) -> None:
        with torch.no_grad():
            f = backbone(x)
        z = h(f)
        loss = F.cross_entropy(z, y)
        if with_distill:
            with torch.no_grad():
                t = t_head(f)
            loss = loss + distill(z, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fns = {"ce": lambda: step(False), "distill: old head on the same features": lambda: step(True)}
    return _ratios(_timeit(fns, reps))


def _trainable_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_old: int, reps: int
) -> dict[str, Any]:
    """Whole-model steps: CE against CE + distillation (cached or live teacher)."""
    distill = DistillationLoss(num_old, temperature=2.0, alpha=1.0)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        soft = distill.soft_targets(teacher(x))  # learn's path when inputs are fixed
    losses = _loss_variants(distill, y, soft, lambda: teacher(x), "teacher forward every step")
    return _time_steps(model, x, losses, 1e-4, reps)


def _ratios(times: dict[str, float]) -> dict[str, Any]:
    ce = times["ce"]
    return {k: {"ms": 1000 * v, "ratio": v / ce} for k, v in times.items()}


def bench_steps(reps: int) -> dict[str, Any]:
    split = digits()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mlp = digits_mlp(10)
    idx = torch.randperm(len(split.x_train), generator=g)[:64]
    x, y = split.x_train[idx], split.y_train[idx]
    with torch.no_grad():
        feats = mlp[:4](x)
    res: dict[str, Any] = {
        "frozen": {
            "digits MLP head 128->10, batch 64": _frozen_steps(mlp[4], feats, y, 7, reps * 4),
        },
        "trainable": {
            "digits MLP 64-128-128-10, batch 64": _trainable_steps(mlp, x, y, 7, reps * 2),
        },
    }
    # an ImageNet-sized head on ResNet-18 features (512 -> 1000, 3 of them new), batch 256
    head = nn.Linear(512, 1000)
    feats = torch.randn(256, 512, generator=g).relu()
    labels = torch.randint(0, 1000, (256,), generator=g)
    res["frozen"]["ResNet-18 head 512->1000, batch 256"] = _frozen_steps(
        head, feats, labels, 997, reps
    )
    try:
        from torchvision.models import resnet18
    except ImportError:  # torchvision is an optional extra
        return res
    model = resnet18(weights=None, num_classes=10)
    xr = torch.randn(32, 3, 32, 32, generator=g)
    yr = torch.randint(0, 10, (32,), generator=g)
    backbone = copy.deepcopy(model)
    backbone.fc = nn.Identity()
    res["frozen"]["ResNet-18 32x32, frozen backbone run each step, batch 32"] = (
        _frozen_backbone_steps(backbone, model.fc, xr, yr, 7, max(reps // 4, 5))
    )
    res["trainable"]["ResNet-18 on 32x32, batch 32"] = _trainable_steps(
        model, xr, yr, 7, max(reps // 4, 5)
    )
    return res


# ----------------------------------------------------------------------------- (b) adding


def _accuracy(model: nn.Module, split: Any) -> float:
    r = evaluate(
        model,
        (split.x_test, split.y_test),
        old_labels=[str(c) for c in BASE],
        new_labels=[str(c) for c in NEW],
    )
    return r.all_accuracy


def _retrain_adamw(base: nn.Module, split: Any, epochs: int, seed: int) -> nn.Module:
    with torch.no_grad():
        feats = base[:4](split.x_train)  # every training example, old and new
    head = nn.Linear(feats.shape[1], 10)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        perm = torch.randperm(len(feats), generator=g)
        for i in range(0, len(feats), 64):
            j = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(head(feats[j]), split.y_train[j]).backward()
            opt.step()
    return _with_head(base, head)


def _retrain_lbfgs(base: nn.Module, split: Any, iters: int) -> nn.Module:
    with torch.no_grad():
        feats = base[:4](split.x_train)
    head = nn.Linear(feats.shape[1], 10)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1, max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )
    y = split.y_train

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # sklearn's default: multinomial logistic regression with an L2 penalty (C=1)
        loss = F.cross_entropy(head(feats), y, reduction="sum") + 0.5 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return _with_head(base, head)


def _with_head(base: nn.Module, head: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    model[4] = head
    model.headgraft_labels = [str(c) for c in range(10)]
    return model


def bench_adding(reps: int) -> dict[str, Any]:
    split = digits()
    base = train_base(split, BASE, seed=0)
    base.headgraft_labels = [str(c) for c in BASE]
    x_old, y_old = split.select(BASE)
    # collected once when the base model was trained, stored beside it: not part of adding
    stats = ClassStats.collect(base, (x_old, y_old), labels=[str(c) for c in BASE])
    x_new, y_new = split.select(NEW)
    new = (x_new, [str(int(c)) for c in y_new])
    out: dict[str, Any] = {}

    def stats_path() -> nn.Module:
        return learn(
            copy.deepcopy(base), new, stats=stats, recipe="data-free", calibrate="none"
        ).model

    paths: dict[str, Callable[[], nn.Module]] = {
        "statistics path (data-free, closed form)": stats_path,
        "retrain head: AdamW 100 epochs": lambda: _retrain_adamw(base, split, 100, 0),
        "retrain head: L-BFGS logistic regression": lambda: _retrain_lbfgs(base, split, 500),
    }
    models = {k: fn() for k, fn in paths.items()}
    times = _timeit({k: (lambda fn=fn: fn()) for k, fn in paths.items()}, reps, warmup=1)
    ref = times["statistics path (data-free, closed form)"]
    ref_acc = _accuracy(models["statistics path (data-free, closed form)"], split)
    for k in paths:
        acc = _accuracy(models[k], split)
        out[k] = {
            "ms": 1000 * times[k],
            "speedup_of_stats_path": times[k] / ref,
            "all_accuracy": acc,
            "stats_path_minus_this": ref_acc - acc,
        }
    return out


# ----------------------------------------------------------------------------- report


def print_report(res: dict[str, Any]) -> None:
    print("(a) one training step: distillation vs plain cross-entropy (median ms, ratio)")
    for regime, models in res["steps"].items():
        target = 1.05 if regime == "frozen" else 1.35
        for model, rows in models.items():
            print(f"  {regime} backbone, {model} (target <= {target:.2f}x):")
            for name, r in rows.items():
                print(f"    {name:52s} {r['ms']:8.3f} ms  {r['ratio']:5.2f}x")
    print()
    print(
        "(b) adding 3 classes: statistics path vs retraining the head on all data "
        "(median ms, all-class test accuracy)"
    )
    for name, r in res["adding"].items():
        print(
            f"  {name:44s} {r['ms']:9.2f} ms  {100 * r['all_accuracy']:5.1f}%  "
            f"stats path {r['speedup_of_stats_path']:6.1f}x faster, "
            f"{100 * r['stats_path_minus_this']:+.1f} points"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40, help="timed repetitions per variant")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core each, so the comparison is not about thread contention
    res = {
        "steps": bench_steps(args.reps),
        "adding": bench_adding(max(args.reps // 8, 3)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
