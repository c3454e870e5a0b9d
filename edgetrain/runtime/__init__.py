"""The on-device fine-tuning runtime: onnxruntime-training's compiled bindings, numpy and PIL only.

Nothing here imports torch or torchvision (a test runs it with them blocked): a board image
carries onnxruntime-training, numpy and an image decoder, not PyTorch.
"""
