"""Present, like the real one, so the fallback is installed into both attention modules."""
