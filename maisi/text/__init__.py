"""Text conditioning: the CLIP tokenizer (from a library) and the encoders that turn prompts into context."""
