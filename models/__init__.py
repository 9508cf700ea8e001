"""hamengine.models"""
