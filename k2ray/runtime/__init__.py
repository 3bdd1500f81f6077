"""What the engine, the executors and the workers share, below all of them: sampling parameters and the sampler
(``sampling.py``), the guided-decoding request (``guided.py``), the step contract between engine and executor
(``step.py``) and the model runner that executes a step on one device (``runner.py``)."""
