"""Infini-attention models on megatron-core."""
