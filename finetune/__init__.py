"""Fine-tuning, evaluation and prediction for instrument recognition on top of a pretrained backbone."""
