# pytest imports this first (the repository root is on sys.path through pyproject's pythonpath).
import torch

# The tests run tiny models: one thread is fastest, and it does not stall when another process
# holds a core (two OpenMP threads on two busy cores can make a step 100x slower).
torch.set_num_threads(1)
