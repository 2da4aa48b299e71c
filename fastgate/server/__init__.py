"""The Python side of the data plane: the supervisor, the workers and their control channel."""
