"""The pyfunc of a trial's logged model, as MLflow's "models from code" file.

MLflow copies this file into every logged model and runs it when the model is loaded, instead
of unpickling a Python object; the class itself is :class:`tracking.models.CalibratedSegmenter`.
"""

import mlflow

from tracking.models import CalibratedSegmenter

mlflow.models.set_model(CalibratedSegmenter())
