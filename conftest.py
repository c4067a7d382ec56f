# pytest imports this first: it puts the repository root on sys.path (so `import zip2zip` works
# from any directory) and lets offline machines find GPT-2's BPE ranks beside the checkout.
import os

_cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tiktoken")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_cache)

# The tests run tiny models: one thread is fastest, and it does not stall when another process
# holds a core (two OpenMP threads on two busy cores can make a step 100x slower).
import torch  # noqa: E402

torch.set_num_threads(1)
