"""Dead letters: the messages the workers gave up on, listed and sent back."""
