"""Pipeline parallelism in one place: the first stage's executor (executor.py), the stage
processes it starts (processes.py) and the stage server every later stage runs (stage.py)."""
