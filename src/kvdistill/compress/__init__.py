"""kvdistill.compress"""
