"""An ordinary Hugging Face ``Trainer`` run that learns new classes without forgetting.

    python examples/hf_trainer.py      (about a minute on two CPU cores)

Real text (standard-library docstrings by topic, ``headgraft.textdata``), the pretrained
MiniLM as a frozen encoder (sentence vectors computed once), a linear classifier trained on
five topics; three topics are grafted and ``Trainer.train()`` runs with ``GraftCallback``,
which freezes the old rows in the Trainer's optimizer and adds distillation to the loss.
"""

import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

import headgraft as hg
from headgraft.learn.hf import GraftCallback
from headgraft.textdata import encode, split, stdlib_docs

OLD = ["email", "unittest", "xml", "logging", "asyncio"]
NEW = ["archives", "numbers", "http"]
ALL = OLD + NEW


class SentenceClassifier(nn.Module):
    """Sentence vectors in, loss and logits out: what Trainer expects of a model."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, features, labels=None):
        logits = self.classifier(features)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def rows(x, y):
    return [{"features": a, "labels": int(b)} for a, b in zip(x, y)]


def accuracy(model, x, y, classes):
    keep = torch.isin(y, torch.tensor([ALL.index(c) for c in classes]))
    with torch.no_grad():
        return float((model(x[keep]).logits.argmax(1) == y[keep]).float().mean())


train, test = split(stdlib_docs(ALL, per_class=90), test_per_class=30)
x_train, x_test = encode([e.text for e in train]), encode([e.text for e in test])
y_train = torch.tensor([ALL.index(e.label) for e in train])
y_test = torch.tensor([ALL.index(e.label) for e in test])
is_old = y_train < len(OLD)

args = dict(
    output_dir=tempfile.mkdtemp(),
    per_device_train_batch_size=32,
    learning_rate=1e-2,
    num_train_epochs=30,
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    disable_tqdm=True,
    logging_strategy="no",
    seed=0,
)

# 1. the user's model: trained on the old topics with an ordinary Trainer
model = SentenceClassifier(x_train.shape[1], len(OLD))
Trainer(
    model=model,
    args=TrainingArguments(**args),
    train_dataset=rows(x_train[is_old], y_train[is_old]),
).train()
model.headgraft_labels = OLD
before = accuracy(model.eval(), x_test, y_test, OLD)

# 2. graft the new topics (imprinted from their examples), keep 20 examples per old topic
new_x, new_y = x_train[~is_old], y_train[~is_old]
hg.add_classes(model, NEW, examples=(new_x, new_y), seed=0)
memory = hg.ExemplarMemory(per_class=20).build(
    model, (x_train[is_old], y_train[is_old]), labels=ALL, classes=OLD
)
mem_x, mem_names = memory.take((x_train[is_old], y_train[is_old]))
mem_y = torch.tensor([ALL.index(n) for n in mem_names])

# 3. an ordinary Trainer run, with the callback
trainer = Trainer(
    model=model,
    args=TrainingArguments(**{**args, "learning_rate": 3e-3, "num_train_epochs": 20}),
    train_dataset=rows(torch.cat([new_x, mem_x.repeat(3, 1)]), torch.cat([new_y, mem_y.repeat(3)])),
    callbacks=[GraftCallback(num_old=len(OLD))],  # teacher: a frozen copy taken at train start
)
trainer.train()
model.eval()
print(f"old topics before grafting: {before:.1%}")
old, new = accuracy(model, x_test, y_test, OLD), accuracy(model, x_test, y_test, NEW)
print(f"after: old {old:.1%}, new {new:.1%}, all {accuracy(model, x_test, y_test, ALL):.1%}")
