"""unpack"""
