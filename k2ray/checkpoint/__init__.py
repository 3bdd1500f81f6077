"""Reading (and writing) Kimi K2-format checkpoints: sharded safetensors, INT4 pack-quantized and FP8 blocks."""


class CheckpointError(ValueError):
    """A checkpoint is malformed; the message names the tensor and/or the file at fault."""
