"""Export for on-device fine-tuning: onnxruntime-training artifacts plus a manifest (`onnx.py`)."""
