"""The native Llama-family model and its loaders."""
