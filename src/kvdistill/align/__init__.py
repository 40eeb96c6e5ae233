"""kvdistill.align"""
