"""hamengine.bench"""
