"""Running a trained classifier outside training, one module a job: ``inference`` (one loader for a checkpoint or an
exported file), ``export`` (ONNX and TorchScript, checked against PyTorch), ``quantize`` and ``int8_graph`` (INT8
ONNX models, checked against fp32), ``serve`` and ``http`` (the HTTP service and its page), ``explain``
(Grad-CAM heat maps). Nothing here imports the command line."""
