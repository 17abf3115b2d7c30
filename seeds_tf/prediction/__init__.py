"""A run answering: loading and predicting with an engine, explanations, export to other engines."""
