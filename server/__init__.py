"""fedspatial.server"""
