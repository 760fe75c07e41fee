"""The seed's other knowledge-transfer methods: siamese/matching/relation nets, MAML, multi-task, DANN."""
