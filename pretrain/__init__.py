"""Spectrogram transformer backbones and their self-supervised pretraining."""
