"""ipld"""
