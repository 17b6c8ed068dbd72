"""``ovd serve``: a trained detector (or an open ONNX export) behind HTTP, with a page to prompt it."""
