"""Model backends: transformers causal LMs with KV-cached sessions (verifier + LM drafters),
n-gram drafters, and where the weights come from (see weights.py)."""
