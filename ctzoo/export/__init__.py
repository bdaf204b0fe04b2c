"""Model bundles to ONNX: the graphs (:mod:`.graphs`), their parity with PyTorch (:mod:`.parity`), and the
Triton-layout repository every runtime path reads (:mod:`.repository`)."""
