"""The one-command pipeline: teacher -> students -> export -> parity -> profile -> report."""

from edgekt.pipeline.config import PipelineConfig, load_pipeline_config
from edgekt.pipeline.run import run_pipeline

__all__ = ["PipelineConfig", "load_pipeline_config", "run_pipeline"]
