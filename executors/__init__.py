"""Where the model runs: in this process (runner.py), as a tensor-parallel group of rank
processes (tensor_parallel.py) or as a pipeline of stage processes (pipeline/, with the stage
server), how an engine gets its runner (build.py: `create_engine`), plus the engine flags
shared by every command that builds an engine (flags.py)."""
