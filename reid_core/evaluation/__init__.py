"""Evaluation passes: features of a query/gallery split from a model, and the retrieval and classification metrics
over them (``features``). Plain PyTorch and the io modules; no Ray, no MLflow."""
