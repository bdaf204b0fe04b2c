"""ONNX export, the KServe v2 service and PACS integration; empty until those issues land."""
