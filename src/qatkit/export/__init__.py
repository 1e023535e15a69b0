"""Export: Q/DQ conversion, ONNX files and their verification in ONNX Runtime."""
