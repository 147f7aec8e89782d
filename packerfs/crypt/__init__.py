"""crypt"""
