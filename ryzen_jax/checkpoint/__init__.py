"""Checkpoints: Hugging Face safetensors in, sharded Orbax out, and loading either onto a mesh."""
