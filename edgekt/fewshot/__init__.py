"""Few-shot learning on the host: episodic sampling, prototypical networks, evaluation."""
