"""headgraft's building blocks in a plain PyTorch loop (digits 0-6 -> add 7, 8, 9).

    python examples/own_loop.py

1. graft: ``add_classes`` grows the trained head (new rows imprinted from 10 shots each);
2. keep old classes: ``ExemplarMemory`` keeps 20 old examples per class and gives
   class-balanced batches, ``DistillationLoss`` holds the old logits to a frozen teacher,
   ``freeze_old_rows`` keeps the old rows bit-identical inside *your* AdamW optimizer;
3. prove: ``headgraft.evaluate`` reports old / new / all accuracy.
"""

import copy

import torch
import torch.nn.functional as F

import headgraft as hg
from headgraft.data import digits
from headgraft.demo import train_base

OLD, NEW = list(range(7)), [7, 8, 9]
data = digits()
model = train_base(data, OLD, epochs=40, seed=0)  # stands in for your trained classifier
model.headgraft_labels = [str(c) for c in OLD]
for p in model.parameters():
    p.requires_grad_(True)
teacher = copy.deepcopy(model).eval()  # the model before grafting

x_old, y_old = data.select(OLD)
x_new, y_new = data.select(NEW)
memory = hg.ExemplarMemory(per_class=20).build(model, (x_old, y_old))
x_mem, mem_names = memory.take((x_old, y_old))
y_mem = torch.tensor([int(n) for n in mem_names])

shots = torch.cat([torch.nonzero(y_new == c).flatten()[:10] for c in NEW])
hg.add_classes(model, [str(c) for c in NEW], examples=(x_new[shots], y_new[shots]), seed=0)

x = torch.cat([x_new, x_mem])
y = torch.cat([y_new, y_mem])
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
frozen = hg.freeze_old_rows(model, optimizer, num_old=len(OLD))
distill = hg.DistillationLoss(temperature=2.0, alpha=1.0)

model.train()
for epoch in range(30):
    # every batch holds new examples and exemplars, each class about equally often
    for idx in memory.batches(y_new, y_mem, batch_size=64, seed=0, epoch=epoch):
        logits = model(x[idx])
        with torch.no_grad():
            old_logits = teacher(x[idx])
        loss = F.cross_entropy(logits, y[idx]) + distill(logits, old_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
frozen.remove()
model.eval()

report = hg.evaluate(
    model,
    (data.x_test, data.y_test),
    old_labels=[str(c) for c in OLD],
    new_labels=[str(c) for c in NEW],
)
print({k: round(v, 3) if isinstance(v, float) else v for k, v in report.summary().items()})
