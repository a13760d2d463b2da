"""Learn: train the new classes without forgetting the old ones.

The pieces work alone in any training loop (``DistillationLoss``, ``freeze_old_rows``,
``ExemplarMemory``, ``calibrate``) and together in :func:`learn` / :class:`Learner`, whose
options are registered strategies (``REGIMES``, ``SOLVERS``, ``REPLAYS``, ``FREEZES``,
``CALIBRATIONS``, ``SELECTIONS``, ``RECIPES`` ...). The package itself is callable:
``headgraft.learn(model, data, ...)`` is :func:`learn`.

Example:
    >>> stats = headgraft.ClassStats.collect(model, old_data)    # once, before grafting
    >>> result = headgraft.learn(model, new_data, stats=stats)   # data-free, closed form
    >>> result = headgraft.learn(model, new_data, old_data=old_data, recipe="replay",
    ...                          regime="full", epochs=10)      # 20 exemplars per class
    >>> report = headgraft.evaluate(result.model, test_data, old_labels=result.old_labels)

In your own loop::

    distill = DistillationLoss(temperature=2.0, alpha=1.0)   # teacher: the pre-graft model
    handle = freeze_old_rows(model, optimizer, num_old=7)     # bit-identical old rows
    loss = F.cross_entropy(logits, y) + distill(logits, teacher_logits)
"""

from .calibrate import CALIBRATIONS as CALIBRATIONS
from .calibrate import Correction as Correction
from .calibrate import calibrate as calibrate
from .freeze import FrozenRows as FrozenRows
from .freeze import freeze_old_rows as freeze_old_rows
from .loop import LearnConfig as LearnConfig
from .loop import Learner as Learner
from .loop import LearnResult as LearnResult
from .loop import learn as learn
from .losses import DistillationLoss as DistillationLoss
from .losses import FeatureDistillationLoss as FeatureDistillationLoss
from .memory import SELECTIONS as SELECTIONS
from .memory import BalancedBatches as BalancedBatches
from .memory import ExemplarMemory as ExemplarMemory
from .strategies import DEVICES as DEVICES
from .strategies import DISTILL_TARGETS as DISTILL_TARGETS
from .strategies import FREEZES as FREEZES
from .strategies import OPTIMIZERS as OPTIMIZERS
from .strategies import PRECISIONS as PRECISIONS
from .strategies import PRIORS as PRIORS
from .strategies import RECIPES as RECIPES
from .strategies import REGIMES as REGIMES
from .strategies import REPLAYS as REPLAYS
from .strategies import SAMPLINGS as SAMPLINGS
from .strategies import SCHEDULES as SCHEDULES
from .strategies import SOLVERS as SOLVERS
from .strategies import lda_rows as lda_rows
from .strategies import oas_shrinkage as oas_shrinkage


def _make_callable() -> None:
    """Let ``headgraft.learn(model, data, ...)`` call :func:`learn` (the package stays a
    package: ``headgraft.learn.DistillationLoss`` etc. keep working)."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003
            return learn(*args, **kwargs)

    sys.modules[__name__].__class__ = _CallableModule


_make_callable()
