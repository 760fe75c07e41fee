"""Host-side continual-learning tools: replay a real stream through the device learner."""
