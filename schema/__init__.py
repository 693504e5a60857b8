"""What jobs/ writes and viz/ reads: the layout of the MLflow runs, below both."""
