"""Offline data preparation for training small MoE models: a multi-domain corpus and its byte-level BPE tokenizer."""
