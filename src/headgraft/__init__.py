"""headgraft: grow a trained classifier's head to new classes, keeping every old class exact.

The flow is graft (find the head, grow it, start new rows, keep labels) -> learn (train
without forgetting) -> prove (evaluate, report).
"""

from .errors import AmbiguousHeadError as AmbiguousHeadError
from .errors import HeadgraftError as HeadgraftError
from .errors import HeadNotFoundError as HeadNotFoundError
from .errors import InputError as InputError
from .errors import LabelError as LabelError
from .errors import UnsafeFileError as UnsafeFileError
from .errors import UnsupportedHeadError as UnsupportedHeadError
from .graft import add_classes as add_classes
from .graft import fuse as fuse
from .graft import remove_classes as remove_classes
from .graft import split as split
from .heads import HEAD_KINDS as HEAD_KINDS
from .heads import LOCATORS as LOCATORS
from .heads import Head as Head
from .heads import find_head as find_head
from .inits import BIASES as BIASES
from .inits import INITS as INITS
from .io.export import export as export
from .io.optim import grow_optimizer_state as grow_optimizer_state
from .labels import LabelMap as LabelMap
from .labels import model_labels as labels  # noqa: F401
from .labels import set_model_labels as set_labels  # noqa: F401
from .layers import CosineLinear as CosineLinear
from .layers import SplitHead as SplitHead
from .stats import ClassStats as ClassStats

# learn and prove: both modules are callable (headgraft.learn(...), headgraft.evaluate(...))
from . import evaluate as evaluate  # noqa: E402  isort: skip
from . import learn as learn  # noqa: E402  isort: skip
from .evaluate import EvalReport as EvalReport  # noqa: E402  isort: skip
from .learn import DistillationLoss as DistillationLoss  # noqa: E402  isort: skip
from .learn import ExemplarMemory as ExemplarMemory  # noqa: E402  isort: skip
from .learn import LearnConfig as LearnConfig  # noqa: E402  isort: skip
from .learn import Learner as Learner  # noqa: E402  isort: skip
from .learn import freeze_old_rows as freeze_old_rows  # noqa: E402  isort: skip

__version__ = "0.1.0"
