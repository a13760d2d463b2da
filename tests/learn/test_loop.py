"""learn / Learner on the issue's digits scenario: the quality bars, exact freezing, exact
resumption, determinism, the strategy checks, and other model shapes (split heads, HF)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headgraft
from headgraft.errors import InputError, LabelError
from headgraft.evaluate import evaluate
from headgraft.learn import RECIPES, LearnConfig, Learner, learn

OLD = [str(c) for c in range(7)]
NEW = ["7", "8", "9"]


def _score(model: nn.Module, scenario) -> headgraft.EvalReport:
    return evaluate(model, scenario.test, old_labels=OLD, new_labels=NEW, reference=scenario.base)


def test_data_free_statistics_only_reaches_the_bar(scenario) -> None:
    """No stored inputs: old-class statistics + new data, closed-form head (>= 94.5%)."""
    result = learn(
        scenario.model(),
        (scenario.x_new, scenario.y_new),
        recipe="data-free",
        stats=scenario.stats,
        seed=0,
    )
    report = _score(result.model, scenario)
    assert result.memory is None and result.resolved["solve"] == "stats"
    assert report.all_accuracy >= 0.945, report.summary()
    assert report.old_as_new < 0.06 and report.new_accuracy > 0.9
    assert result.labels == OLD + NEW and headgraft.labels(result.model).names == OLD + NEW


def test_twenty_exemplars_trainable_backbone_reaches_the_bar(scenario) -> None:
    """20 stored examples per old class (herding), backbone trained, statistics (>= 96.0%)."""
    model = scenario.model()
    body0 = model[0].weight.detach().clone()
    result = learn(
        model,
        (scenario.x_new, scenario.y_new),
        recipe="replay",
        regime="full",
        stats=scenario.stats,
        old_data=(scenario.x_old, scenario.y_old),
        memory_per_class=20,
        seed=0,
    )
    report = _score(result.model, scenario)
    assert len(result.memory) == 140 and result.resolved["replay"] == "exemplars"
    assert not torch.equal(model[0].weight, body0)  # the backbone really trained
    assert report.all_accuracy >= 0.960, report.summary()


def test_naive_fine_tuning_forgets_and_the_default_does_not(scenario) -> None:
    naive = learn(
        scenario.model(),
        (scenario.x_new, scenario.y_new),
        recipe="naive",
        regime="full",
        epochs=5,
        seed=0,
    )
    auto = learn(scenario.model(), (scenario.x_new, scenario.y_new), stats=scenario.stats, seed=0)
    r_naive, r_auto = _score(naive.model, scenario), _score(auto.model, scenario)
    assert r_naive.old_as_new > 0.5 and r_naive.forgetting > 0.5
    assert r_auto.old_accuracy > 0.9 and r_auto.forgetting < 0.06


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int32)


@pytest.mark.parametrize("regime", ["full", "frozen"])
def test_frozen_old_rows_stay_bit_identical_through_a_whole_run(scenario, regime) -> None:
    """AdamW with weight decay, every epoch, then calibration: old rows never move."""
    model = scenario.model()
    w0, b0 = _bits(scenario.base[4].weight), _bits(scenario.base[4].bias)
    result = learn(
        model,
        (scenario.x_new, scenario.y_new),
        regime=regime,
        freeze="old-rows",
        optimizer="adamw",
        weight_decay=0.1,
        lr=1e-2,
        epochs=3,
        old_data=(scenario.x_old, scenario.y_old),
        memory_per_class=10,
        calibrate="weight-align",
        seed=0,
    )
    head = result.model[4]
    assert result.resolved["solve"] == "stats-new"  # old rows are kept, so not re-solved
    assert torch.equal(_bits(head.weight)[:7], w0) and torch.equal(_bits(head.bias)[:7], b0)
    assert head.weight.shape[0] == 10
    if regime == "full":
        assert not torch.equal(result.model[0].weight, scenario.base[0].weight)
    else:
        assert torch.equal(result.model[0].weight, scenario.base[0].weight)


def test_old_rows_cannot_be_frozen_without_old_features(scenario) -> None:
    with pytest.raises(InputError, match="collapses the old classes"):
        learn(scenario.model(), (scenario.x_new, scenario.y_new), freeze="old-rows", epochs=2)


class _Stop(Exception):
    pass


def _stop_after(epoch: int):
    def cb(record: dict) -> None:
        if record["epoch"] == epoch:
            raise _Stop

    return cb


@pytest.mark.parametrize("regime", ["full", "frozen"])
def test_resume_continues_bit_for_bit(tmp_path, scenario, regime) -> None:
    kwargs = dict(
        recipe="replay",
        regime=regime,
        old_data=(scenario.x_old, scenario.y_old),
        memory_per_class=10,
        epochs=4,
        seed=5,
        stats=scenario.stats,
        solve="stats-new",
        weight_decay=0.05,
    )
    data = (scenario.x_new, scenario.y_new)
    full = learn(scenario.model(), data, checkpoint_dir=tmp_path / "a", **kwargs)
    with pytest.raises(_Stop):
        learn(
            scenario.model(),
            data,
            checkpoint_dir=tmp_path / "b",
            callbacks=[_stop_after(2)],
            **kwargs,
        )
    assert (tmp_path / "b" / "last.pt").is_file()
    resumed = learn(scenario.model(), data, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    assert resumed.resumed_from == 2 and len(resumed.history) == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, scenario) -> None:
    data = (scenario.x_new, scenario.y_new)
    learn(
        scenario.model(),
        data,
        stats=scenario.stats,
        epochs=1,
        replay="stats",
        solve="stats-new",
        checkpoint_dir=tmp_path,
        seed=0,
    )
    with pytest.raises(InputError, match="other settings"):
        learn(
            scenario.model(),
            data,
            stats=scenario.stats,
            epochs=1,
            replay="stats",
            solve="stats-new",
            checkpoint_dir=tmp_path,
            seed=1,
            resume=True,
        )


def test_same_seed_same_model_other_seed_other_model(scenario) -> None:
    def run(seed: int) -> dict:
        return learn(
            scenario.model(),
            (scenario.x_new, scenario.y_new),
            recipe="lwf",
            regime="full",
            epochs=2,
            seed=seed,
        ).model.state_dict()

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_stats_replay_trains_on_pseudo_features(scenario) -> None:
    result = learn(
        scenario.model(),
        (scenario.x_new, scenario.y_new),
        recipe="stats-replay",
        stats=scenario.stats,
        epochs=5,
        seed=0,
    )
    assert result.resolved["replay"] == "stats" and result.resolved["pseudo_per_batch"] > 0
    report = _score(result.model, scenario)
    assert report.old_accuracy > 0.8 and report.new_accuracy > 0.6


def test_strategy_checks_name_the_fix(scenario) -> None:
    data = (scenario.x_new, scenario.y_new)
    with pytest.raises(InputError, match="backbone must stay frozen"):
        learn(scenario.model(), data, stats=scenario.stats, regime="full", replay="stats")
    with pytest.raises(InputError, match="unknown recipe 'magic'; choose one of"):
        learn(scenario.model(), data, recipe="magic")
    with pytest.raises(InputError, match="unknown learn setting"):
        learn(scenario.model(), data, epochz=3)
    with pytest.raises(InputError, match="old_data"):
        learn(scenario.model(), data, memory=headgraft.ExemplarMemory(2))
    with pytest.raises(InputError, match="needs an exemplar memory"):
        learn(scenario.model(), data, replay="exemplars")
    with pytest.raises(LabelError, match="neither an old nor a new class"):
        learn(scenario.model(), data, new_labels=["7", "8"])
    with pytest.raises(InputError, match="unknown regime"):
        LearnConfig(regime="warm").validate()
    assert {"naive", "lwf", "replay", "data-free", "auto"} <= set(RECIPES.names())


def test_pre_grafted_split_head_keeps_its_old_block(scenario) -> None:
    model = scenario.model()
    idx = torch.cat(
        [torch.nonzero(torch.tensor([y == c for y in scenario.y_new])).flatten()[:5] for c in NEW]
    )
    headgraft.add_classes(
        model, NEW, layout="split", examples=(scenario.x_new[idx], [scenario.y_new[i] for i in idx])
    )
    old = {k: v.clone() for k, v in model[4].old.state_dict().items()}
    model[4].old.requires_grad_(False)
    result = Learner(epochs=3, seed=0).fit(
        model, (scenario.x_new, scenario.y_new), old_data=(scenario.x_old, scenario.y_old)
    )
    assert result.num_old == 7 and result.resolved["solve"] == "stats-new"
    for k, v in model[4].old.state_dict().items():
        assert torch.equal(v, old[k])
    assert _score(result.model, scenario).all_accuracy > 0.85


def test_eval_data_gives_before_and_after(scenario) -> None:
    result = learn(
        scenario.model(),
        (scenario.x_new, scenario.y_new),
        stats=scenario.stats,
        eval_data=scenario.test,
    )
    assert result.before.new_accuracy == 0.0 and result.before.old_accuracy > 0.95
    assert result.after.all_accuracy > result.before.all_accuracy
    assert result.after.forgetting is not None
    d = result.to_dict()
    assert d["after"]["all_accuracy"] == result.after.all_accuracy


def test_hugging_face_dict_batches_full_regime() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label={0: "a", 1: "b"},
        label2id={"a": 0, "b": 1},
    )
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(4):  # padded per batch, lengths differ between batches
        length = 6 + i
        ids = torch.randint(1, 60, (8, length), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, length - 2 :] = 0
        ids[mask == 0] = 0
        labels = ["c" if j % 2 else ["a", "b"][j % 4 // 2] for j in range(8)]
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    result = learn(model, batches, regime="full", epochs=2, batch_size=8, seed=0)
    assert result.labels == ["a", "b", "c"] and result.num_old == 2
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert model.classifier.out_features == 3
    out = model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    assert out.logits.shape == (8, 3)


def test_weight_align_with_clipping_and_bf16_autocast(scenario) -> None:
    """WA's clipping step keeps the trained rows non-negative; bf16 autocast runs on CPU."""
    result = learn(
        scenario.model(),
        (scenario.x_new, scenario.y_new),
        recipe="lwf",
        regime="full",
        calibrate="weight-align",
        wa_clip=True,
        freeze="nothing",
        epochs=2,
        precision="bf16",
        device="cpu",
        seed=0,
    )
    head = result.model[4]
    assert bool((head.weight >= 0).all())
    norms = head.weight.detach().norm(dim=1)
    assert float(norms[7:].mean()) == pytest.approx(float(norms[:7].mean()), rel=1e-4)
    assert result.resolved["precision"] == "bfloat16" and result.correction["name"] == (
        "weight-align"
    )


def test_full_regime_with_frozen_backbone_and_a_dataloader(scenario) -> None:
    """A map-style Dataset may augment at random, so the teacher runs live every step; with
    freeze='backbone' only the head learns even though every step runs the whole model."""
    from torch.utils.data import DataLoader, TensorDataset

    y = torch.tensor([int(c) for c in scenario.y_new])  # integers index old + new labels
    loader = DataLoader(TensorDataset(scenario.x_new, y), batch_size=32)
    with pytest.raises(InputError, match="new_labels"):
        learn(scenario.model(), loader, regime="full", epochs=1)
    model = scenario.model()
    body = {k: v.clone() for k, v in model[:4].state_dict().items()}
    result = learn(
        model,
        loader,
        new_labels=NEW,
        recipe="lwf",
        regime="full",
        freeze="backbone",
        epochs=2,
        seed=0,
    )
    assert result.resolved["cache_teacher"] is False and result.history[-1]["distill"] > 0
    assert all(torch.equal(v, body[k]) for k, v in model[:4].state_dict().items())
    assert model[4].weight.shape == (10, 128)
    assert _score(model, scenario).new_accuracy > 0.8
