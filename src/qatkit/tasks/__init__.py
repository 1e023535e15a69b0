"""Tasks: loss, metrics, agreement and report columns for classification, binary and regression models."""

from qatkit.base.batch import output_tensor
from qatkit.tasks.base import TASKS, Objective, SupervisedObjective, Task, predict
from qatkit.tasks.binary import BinaryTask
from qatkit.tasks.classification import ClassificationTask, class_weight_tensor
from qatkit.tasks.regression import RegressionTask

__all__ = [
    "TASKS",
    "BinaryTask",
    "ClassificationTask",
    "Objective",
    "RegressionTask",
    "SupervisedObjective",
    "Task",
    "class_weight_tensor",
    "output_tensor",
    "predict",
]
