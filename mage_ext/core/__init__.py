"""The model-agnostic core: policy, the generation's cache, selectors (exact, MAGE and the
baselines behind one interface), decoding rules, the block loop over a ``forward`` callable,
CUDA-graph replay and traffic accounting. It imports neither transformers nor mage_ext.eval;
mage_ext.hf adapts transformers models to it."""
