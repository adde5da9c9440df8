"""plasma.server"""
