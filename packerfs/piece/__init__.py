"""piece"""
