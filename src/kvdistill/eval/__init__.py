"""kvdistill.eval"""
