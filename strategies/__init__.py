"""fedspatial.strategies"""
