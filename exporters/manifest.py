"""``manifest.json`` of an edge package: the schema lives in :mod:`edgekt.metadata`.

Kept as an import path for code written against earlier versions.
"""

from edgekt.metadata import PACKAGE_FORMAT as FORMAT
from edgekt.metadata import ArtifactEntry, Manifest

__all__ = ["FORMAT", "ArtifactEntry", "Manifest"]
