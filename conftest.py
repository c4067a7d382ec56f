# pytest imports this first: it puts the repository root on sys.path (so `import zip2zip` works
# from any directory) and lets offline machines find GPT-2's BPE ranks beside the checkout.
import os

_cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tiktoken")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_cache)
