"""The ``k2ray-demo`` model's trainer: its synthetic corpus (``corpus``) and its training, export, evaluation and
model card (``train``; ``k2ray train-demo`` runs it)."""
