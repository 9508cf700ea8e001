"""hamengine.loaders"""
