"""fedspatial.shared"""
