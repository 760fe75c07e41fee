"""Few-shot learning on the host: episodic sampling, prototypical networks, evaluation.

Importing this package registers the ``protonet`` training method in ``edgekt.engine.METHODS``.
"""

from edgekt.fewshot import protonet  # noqa: F401  (registers the method)
from edgekt.fewshot.episodes import Episode, EpisodeSampler, EpisodeSpec, episode_batch

__all__ = ["Episode", "EpisodeSampler", "EpisodeSpec", "episode_batch"]
