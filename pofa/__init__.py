"""pofa: Prune Once for All.

Sparse pre-trained BERT-family encoders: teacher preparation, gradual magnitude pruning with distillation,
pattern-locked sparse transfer, 8-bit quantization-aware training, and a compact int8 deployment format.
"""

__version__ = "0.1.0"
