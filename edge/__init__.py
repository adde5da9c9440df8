"""plasma.edge"""
