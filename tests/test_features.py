"""Head inputs: batches from the shapes users have, pooled conv maps, the last real token."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import headgraft as hg
from headgraft.features import (
    capture_inputs,
    forward,
    head_features,
    iter_batches,
    logits_of,
)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))


# ----------------------------------------------------------------------------- iter_batches


def test_tensor_pair_is_split_into_batches() -> None:
    x, y = torch.randn(10, 4), torch.arange(10)
    batches = list(iter_batches((x, y), batch_size=4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_tensor_with_name_list_pairs() -> None:
    x = torch.randn(3, 4)
    ((bx, by),) = list(iter_batches((x, ["a", "b", "a"])))
    assert torch.equal(bx, x) and list(by) == ["a", "b", "a"]


def test_dataloader_batches_pass_through() -> None:
    x, y = torch.randn(7, 4), torch.arange(7)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    batches = list(iter_batches(loader))
    assert [tuple(b[0].shape) for b in batches] == [(3, 4), (3, 4), (1, 4)]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


@pytest.mark.parametrize("key", ["labels", "label"])
def test_dict_batches_split_off_the_labels(key: str) -> None:
    ids = torch.ones(2, 5, dtype=torch.long)
    ((inputs, labels),) = list(iter_batches([{"input_ids": ids, key: torch.tensor([1, 0])}]))
    assert set(inputs) == {"input_ids"}
    assert torch.equal(labels, torch.tensor([1, 0]))


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ((torch.randn(3, 2), torch.arange(2)), "3 inputs but 2 labels"),
        ({"input_ids": torch.ones(2, 3)}, "not a single dict; wrap it in a list"),
        (42, "not iterable; pass"),
        ([{"input_ids": torch.ones(2, 3)}], "no 'labels' key"),
        ([torch.randn(3)], "each batch must be"),
    ],
    ids=["count-mismatch", "single-dict", "not-iterable", "dict-without-labels", "bare-tensor"],
)
def test_bad_example_shapes_name_the_fix(data: object, pattern: str) -> None:
    with pytest.raises(hg.InputError, match=pattern):
        list(iter_batches(data))


# ----------------------------------------------------------------------------- head_features


def test_linear_head_features_are_the_penultimate_activations_in_eval_mode() -> None:
    model = mlp().train()
    x = torch.randn(9, 5)
    feats, labels, logits = head_features(
        model, (x, torch.arange(9) % 3), ["3"], batch_size=4, with_logits=True
    )
    model.eval()
    with torch.no_grad():
        want = model[:3](x)  # dropout off: features are those of eval mode
        assert torch.equal(feats["3"], want)
        assert torch.equal(logits, model(x))
    assert labels == [i % 3 for i in range(9)]
    assert model.training is False  # we set eval ourselves above
    model.train()
    head_features(model, (x, torch.zeros(9)), ["3"])
    assert model.training  # the caller's mode comes back


def test_no_hooks_are_left_behind() -> None:
    model = mlp()
    with capture_inputs(model, ["3"]) as store:
        model(torch.randn(2, 5))
    assert len(store["3"]) == 1
    assert not model[3]._forward_pre_hooks
    head_features(model, (torch.randn(2, 5), [0, 1]), ["3"])
    assert not model[3]._forward_pre_hooks


class ConvNet(nn.Module):
    """A SqueezeNet-shaped classifier: a 1x1 conv head on a feature map, then a global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_conv_head_features_are_pooled_maps() -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(3, 3, 5, 6)
    feats, _, _ = head_features(model, (x, [0, 1, 2]), ["classifier.1"])
    with torch.no_grad():
        want = model.features(x).mean(dim=(2, 3))
    torch.testing.assert_close(feats["classifier.1"], want)
    assert hg.find_head(model).kind == "conv1x1"


def test_conv_head_imprint_and_stats_use_pooled_features() -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(6, 3, 4, 4)
    stats = hg.ClassStats.collect(model, (x, ["n"] * 3 + ["m"] * 3))
    assert stats.dim == 8 and stats.counts.tolist() == [3, 3]
    hg.add_classes(model, ["n", "m"], init="imprint", examples=(x, ["n"] * 3 + ["m"] * 3))
    assert model.classifier[1].weight.shape == (6, 8, 1, 1)
    assert model(x).shape == (6, 6)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=24,
        pad_token_id=0,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_features_are_those_of_the_last_real_token(side: str) -> None:
    """Llama scores every token and pools the last real one; features must match that."""
    model = _llama()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    if side == "right":
        mask[1, 4:] = 0
        mask[2, 6:] = 0
    else:
        mask[1, :3] = 0
        mask[2, :1] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": [0, 1, 2]}
    feats, _, logits = head_features(model, [batch], ["score"], with_logits=True)
    f = feats["score"]
    assert f.shape == (3, 16)
    # the head applied to our features gives the model's own (pooled) logits
    torch.testing.assert_close(f @ model.score.weight.T, logits)


def test_token_features_without_mask_take_the_last_token() -> None:
    seen = torch.randn(2, 4, 3)
    lin = nn.Linear(3, 2)

    class PerToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x)[:, -1]

    feats, _, _ = head_features(PerToken(), (seen, [0, 1]), ["head"])
    assert torch.equal(feats["head"], seen[:, -1])


def test_empty_examples_are_an_error() -> None:
    with pytest.raises(hg.InputError, match="examples are empty"):
        head_features(mlp(), (torch.randn(0, 5), torch.zeros(0)), ["3"])


# ----------------------------------------------------------------------------- outputs


def test_logits_of_reads_every_output_shape() -> None:
    t = torch.randn(2, 3)
    assert logits_of(t) is t
    assert logits_of((t, "aux")) is t
    assert logits_of(transformers.modeling_outputs.SequenceClassifierOutput(logits=t)) is t
    with pytest.raises(hg.InputError, match="cannot read logits"):
        logits_of("nope")


def test_forward_passes_dicts_as_keywords() -> None:
    class Kw(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return input_ids * attention_mask

    out = forward(Kw(), {"input_ids": torch.tensor([2]), "attention_mask": torch.tensor([3])})
    assert out.item() == 6
