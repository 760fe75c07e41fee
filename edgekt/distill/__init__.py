"""Distillation: KD losses as pure tensor functions and the distillation task."""
