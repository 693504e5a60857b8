"""What jobs/ writes and viz/ reads (the layout of the MLflow runs) and how both turn their
settings dataclasses into CLI flags (`cli.py`): below both."""
