"""The seed's other knowledge-transfer methods: siamese, matching, relation, MAML, multi-task, DANN.

Importing this package registers the methods in ``edgekt.engine.tasks.METHODS``.
"""

from edgekt.methods import dann, maml, matching, multitask, relation, siamese  # noqa: F401
