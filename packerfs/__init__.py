"""packerfs: package data sets as encrypted, bin-sized CAR files for Filecoin deals, and back."""

__version__ = "0.1.0"
