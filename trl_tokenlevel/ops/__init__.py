"""Pure tensor math: one function per method or family, the equation in each docstring. No model, trainer or
tokenizer code lives here."""
