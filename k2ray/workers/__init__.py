"""The actor classes of a model group (thin shells over model/, executor/runner.py and parallel/).

They are plain classes; ``k2ray.executor.ray`` turns them into Ray actors, so they can also be driven directly.
"""
