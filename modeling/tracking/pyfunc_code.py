"""Models-from-code entry point of the msata pyfunc: MLflow runs this file to build the model.

Nothing is unpickled when the model loads: MLflow executes this file (from the
model's copy of the code) and the model reads its checkpoint artifact in
``load_context`` with ``torch.load(weights_only=True)``.
"""

import mlflow

from modeling.tracking.pyfunc_model import MsataPyfunc

mlflow.models.set_model(MsataPyfunc())
