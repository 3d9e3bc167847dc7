"""fedspatial.client"""
