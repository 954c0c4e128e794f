"""Our own transformer code for the Llama family (Llama, Mistral, Qwen2) and its checkpoint loader."""
